"""Several adapters scored as one ensemble: through the engine, the engine protocol, the CLI, the SR and
the Slicer results table. The combination rule itself (``ensemble.combine``) is tested in test_ensemble.py;
here every number is checked against scoring each member alone.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import time

import numpy as np
import pytest
import torch
from helpers import ENSEMBLE_SPEC, ensemble_probabilities, save_tiny_adapter, sr_text

from MedLoRALib.engine import ScoringEngine
from MedLoRALib.errors import AdapterError
from MedLoRALib.patches import PatchSpec

torch.set_num_threads(1)
SPEC = ENSEMBLE_SPEC  # one 32 px image per nodule: fast
PATCHES = np.random.default_rng(3).random((4, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def members(ensemble_members):
    """conftest's three members (site-a and site-b disagree; site-c at threshold 0.3)."""
    return ensemble_members


@pytest.fixture
def engine(members):
    engine = ScoringEngine(device="cpu")
    for path in members.values():
        engine.attach_adapter(path)
    return engine


def _alone(engine, names, patches=PATCHES, tta=False):
    return np.array([[r["probability"] for r in engine.score_patches(patches, name, tta=tta)] for name in names])


# --- engine -------------------------------------------------------------------------------------
def test_ensemble_equals_each_member_scored_alone_on_one_loaded_backbone(engine):
    names = ["site-a", "site-b", "site-c"]
    loads = engine.backbone_loads
    assert loads == 1  # three LoRA adapters share one backbone
    results = engine.score_patches_ensemble(PATCHES, names, tta=False)
    assert engine.backbone_loads == loads  # no reload to switch members
    alone = _alone(engine, names)
    members = np.array([[m["probability"] for m in r["members"]] for r in results]).T
    np.testing.assert_allclose(members, alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["probability"] for r in results], alone.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["spread"] for r in results], alone.std(axis=0), rtol=0, atol=1e-6)
    thresholds = np.array([0.5, 0.5, 0.3])
    positive = alone >= thresholds[:, None]
    assert [r["disagree"] for r in results] == (positive.any(0) & ~positive.all(0)).tolist()
    assert any(r["disagree"] for r in results)  # the biases make site-a and site-b disagree
    first = results[0]
    assert first["adapters"] == names and first["adapter"] == "site-a+site-b+site-c"
    assert first["threshold"] == pytest.approx(thresholds.mean())
    assert first["label"] == ("malignant" if first["probability"] >= thresholds.mean() else "benign")
    assert [m["adapter"] for m in first["members"]] == names
    assert first["adapter_version"] == "+".join(engine.manifest(n).version_id for n in names)
    assert first["random_init"] is True  # the tiny backbone is random-init, and the ensemble says so


def test_ensemble_with_tta_matches_members_with_tta(engine):
    names = ["site-b", "site-a"]
    results = engine.score_patches_ensemble(PATCHES[:2], names, tta=True)
    np.testing.assert_allclose([r["probability"] for r in results],
                               _alone(engine, names, PATCHES[:2], tta=True).mean(axis=0), rtol=0, atol=1e-6)
    assert results[0]["adapters"] == names  # members in the order asked


def test_a_full_fine_tuned_adapter_may_join_when_backbone_and_spec_match(members, tmp_path):
    engine = ScoringEngine(device="cpu")
    engine.attach_adapter(members["site-a"])
    full, _ = save_tiny_adapter(tmp_path, "full", SPEC, seed=7, mode="full")
    engine.attach_adapter(full)
    loads = engine.backbone_loads
    results = engine.score_patches_ensemble(PATCHES, ["site-a", "full"], tta=False)
    assert engine.backbone_loads == loads == 2  # the full adapter brought its own network, once
    np.testing.assert_allclose([r["probability"] for r in results],
                               _alone(engine, ["site-a", "full"]).mean(axis=0), rtol=0, atol=1e-6)


def test_a_set_with_other_preprocessing_or_backbone_is_refused_naming_both(engine, tmp_path):
    other_spec, _ = save_tiny_adapter(tmp_path, "wide", PatchSpec(views="ortho3", fov_mm=64.0, pixels=32), seed=4)
    engine.attach_adapter(other_spec)
    with pytest.raises(AdapterError, match=r"'site-a' and 'wide'.*preprocessing \(patch spec\) differ"):
        engine.score_patches_ensemble(PATCHES, ["site-a", "wide"])
    other_backbone, _ = save_tiny_adapter(tmp_path, "synth", SPEC, seed=5, backbone="medlora_tiny_synthct")
    engine.attach_adapter(other_backbone)
    with pytest.raises(AdapterError, match=r"'site-b' and 'synth'.*backbone differ"):
        engine.score_patches_ensemble(PATCHES, ["site-b", "synth"])
    with pytest.raises(AdapterError, match="named twice"):
        engine.score_patches_ensemble(PATCHES, ["site-a", "site-a"])
    with pytest.raises(AdapterError, match="at least two"):
        engine.score_patches_ensemble(PATCHES, ["site-a"])
    with pytest.raises(AdapterError, match="'nowhere' is not attached"):
        engine.score_patches_ensemble(PATCHES, ["site-a", "nowhere"])


def test_blocks_no_member_adapts_run_once_for_the_ensemble(tmp_path):
    """LoRA on the last 2 of the tiny ViT's 6 blocks (and a linear probe): blocks 0-3 are computed once."""
    from MedLoRALib.models import LoraSpec

    engine = ScoringEngine(device="cpu")
    last2 = LoraSpec(rank=4, targets="qkv", last_n_blocks=2)  # fused qkv: the linear probe shares that backbone
    for name, options in {"late-a": dict(seed=1, lora=last2, head_bias=2.0), "late-b": dict(seed=2, lora=last2),
                          "probe": dict(seed=3, mode="linear")}.items():
        engine.attach_adapter(save_tiny_adapter(tmp_path, name, SPEC, **options)[0])
    names = ["late-a", "late-b", "probe"]
    assert engine.shared_prefix_blocks(names) == 4 and engine.backbone_loads == 1
    blocks = engine._adapters["late-a"].model.vit.blocks
    calls = {0: 0, 5: 0}
    hooks = [blocks[i].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    try:
        for tta in (False, True):
            calls.update({0: 0, 5: 0})
            results = engine.score_patches_ensemble(PATCHES, names, tta=tta)
            assert calls == {0: 1, 5: 3}  # one batch: the shared block once, an adapted one per member
            alone = _alone(engine, names, tta=tta)
            members = np.array([[m["probability"] for m in r["members"]] for r in results]).T
            np.testing.assert_allclose(members, alone, rtol=0, atol=1e-6)
            np.testing.assert_allclose([r["spread"] for r in results], alone.std(axis=0), rtol=0, atol=1e-6)
    finally:
        for hook in hooks:
            hook.remove()
    assert engine.shared_prefix_blocks(["late-a", "probe"]) == 4
    engine.attach_adapter(save_tiny_adapter(tmp_path, "every", SPEC, seed=4, lora=LoraSpec(targets="qkv"))[0])
    assert engine.shared_prefix_blocks(["late-a", "every"]) == 0  # LoRA on every block: only the embedding


# --- engine protocol ------------------------------------------------------------------------------
def _encode(patches):
    data = base64.b64encode(np.ascontiguousarray(patches, np.float32).tobytes()).decode("ascii")
    return {"dtype": "float32", "shape": list(patches.shape), "data": data}


def test_serve_scores_an_ensemble_and_keeps_the_single_adapter_request(engine):
    from MedLoRALib.serve import EngineServer

    server = EngineServer(engine, lambda _: None)
    request = {"id": 1, "op": "score", "patches": _encode(PATCHES), "tta": False}
    reply = server.handle(json.dumps({**request, "adapters": ["site-a", "site-b"]}))
    assert reply["ok"], reply
    direct = engine.score_patches_ensemble(PATCHES, ["site-a", "site-b"], tta=False)
    assert reply["result"]["results"] == json.loads(json.dumps(direct))
    assert {"probability", "spread", "disagree", "label", "threshold", "adapters", "members"} <= set(direct[0])
    single = server.handle(json.dumps({**request, "adapter": "site-a"}))  # unchanged: one adapter, no ensemble
    assert single["ok"] and "spread" not in single["result"]["results"][0]
    assert single["result"]["results"][0]["probability"] == direct[0]["members"][0]["probability"]


def test_serve_answers_a_bad_ensemble_with_an_error_and_carries_on(engine, tmp_path):
    from MedLoRALib.serve import EngineServer

    wide, _ = save_tiny_adapter(tmp_path, "wide", PatchSpec(views="ortho3", fov_mm=64.0, pixels=32), seed=4)
    engine.attach_adapter(wide)
    server = EngineServer(engine, lambda _: None)
    request = {"id": 2, "op": "score", "patches": _encode(PATCHES), "tta": False}
    cases = {
        "AdapterError": ({"adapters": ["site-a", "wide"]}, r"'site-a' and 'wide' cannot be combined.*patch spec"),
        "ProtocolError": ({"adapters": "site-a,site-b"}, "list of 1 to 64 adapter names"),
    }
    for kind, (extra, message) in cases.items():
        reply = server.handle(json.dumps({**request, **extra}))
        assert reply["id"] == 2 and not reply["ok"] and reply["error"]["type"] == kind
        assert re.search(message, reply["error"]["message"]), reply
    both = server.handle(json.dumps({**request, "adapter": "site-a", "adapters": ["site-a", "site-b"]}))
    assert not both["ok"] and "either 'adapter'" in both["error"]["message"]
    assert server.handle(json.dumps({**request, "adapters": ["site-a", "site-b"]}))["ok"]  # still serving


# --- CLI and DICOM SR on the real LIDC-IDRI-0001 series -------------------------------------------------
@pytest.mark.slow
def test_score_cli_with_an_ensemble_writes_its_columns_and_sr(lidc_0001, members, tmp_path, capsys):

    from MedLoRALib.annotations import load_nodules
    from MedLoRALib.cli import main
    from MedLoRALib.ctio import load_ct
    from MedLoRALib.report.sr import DISAGREE_CONCEPT, ENSEMBLE_RULE_PARAMETER, manifest_sha256

    hd = pytest.importorskip("highdicom")
    xml = next(lidc_0001.glob("*.xml"))
    table, sr = tmp_path / "scores.csv", tmp_path / "scores.dcm"
    adapters = [a for name in ("site-a", "site-b") for a in ("--adapter", str(members[name]))]
    common = ["score", "--volume", str(lidc_0001), "--points", str(xml), *adapters, "--device", "cpu", "--no-tta"]
    assert main([*common, "--out", str(table), "--sr", str(sr)]) == 0
    assert "they disagree across their thresholds on" in capsys.readouterr().err
    header = table.read_text().splitlines()[0].split(",")
    assert header[-2:] == ["p_site-a", "p_site-b"] and {"probability", "spread", "disagree"} <= set(header)
    assert "view_probabilities" not in header  # a mean of members has no per-view probabilities of its own
    (row,) = list(csv.DictReader(table.open(newline="")))

    ct = load_ct(lidc_0001)
    nodules = load_nodules(xml, image=ct)
    engine = ScoringEngine(device="cpu")
    alone = []
    for name in ("site-a", "site-b"):
        engine.attach_adapter(members[name])
        alone.append(engine.score(ct, nodules, tta=False)[0]["probability"])
    assert float(row["p_site-a"]) == pytest.approx(alone[0], abs=1e-6)
    assert float(row["p_site-b"]) == pytest.approx(alone[1], abs=1e-6)
    assert float(row["probability"]) == pytest.approx(np.mean(alone), abs=1e-6)
    assert float(row["spread"]) == pytest.approx(np.std(alone), abs=1e-6)
    assert row["disagree"] == ("true" if (alone[0] >= 0.5) != (alone[1] >= 0.5) else "false") == "true"
    assert row["adapter"] == "site-a+site-b" and row["random_init"] == "true"

    (group,) = hd.sr.srread(sr).content.get_planar_roi_measurement_groups()
    assert np.allclose(group.roi.value, [nodules[0].centre_lps], atol=0.01)
    by_derivation, member_probabilities = ensemble_probabilities(group)
    assert by_derivation["Mean"] == pytest.approx(float(row["probability"]), abs=1e-9)
    assert by_derivation["Standard Deviation"] == pytest.approx(float(row["spread"]), abs=1e-9)
    assert member_probabilities == pytest.approx({"site-a": alone[0], "site-b": alone[1]}, abs=1e-6)
    (disagree,) = group.get_qualitative_evaluations(name=hd.sr.CodedConcept(*DISAGREE_CONCEPT))
    assert disagree.value.meaning == "Yes"
    parameters = sr_text(group[0], "Algorithm Parameters")  # the group's algorithm: the ensemble
    assert sr_text(group[0], "Algorithm Name") == ["site-a+site-b"]
    assert "members=site-a,site-b" in parameters and ENSEMBLE_RULE_PARAMETER in parameters
    assert any(f"manifest_sha256={manifest_sha256(engine.manifest('site-b'))}" in p for p in parameters)

    import shutil
    import subprocess

    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(sr)], capture_output=True, text=True, timeout=60)
        report = check.stdout + check.stderr
        assert "Comprehensive3DSR" in report
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], report

    json_out = tmp_path / "scores.json"
    assert main([*common, "--out", str(json_out)]) == 0
    data = json.loads(json_out.read_text())
    assert data["adapter"]["ensemble"] is True and [m["name"] for m in data["adapter"]["members"]] == ["site-a",
                                                                                                      "site-b"]
    assert data["results"][0]["p_site-b"] == pytest.approx(alone[1], abs=1e-6)
    assert main([*common, "--out", str(table), "--overwrite"]) == 0  # an ensemble table is ours to replace


def test_score_cli_refuses_an_ensemble_of_other_preprocessing_before_loading(lidc_0001, members, tmp_path, capsys):
    from helpers import tree_digest

    from MedLoRALib.cli import main

    wide, _ = save_tiny_adapter(tmp_path / "in", "wide", PatchSpec(views="ortho3", fov_mm=64.0, pixels=32), seed=4)
    out = tmp_path / "out"
    out.mkdir()
    before = tree_digest(tmp_path)
    xml = next(lidc_0001.glob("*.xml"))
    code = main(["score", "--volume", str(lidc_0001), "--points", str(xml), "--adapter", str(members["site-a"]),
                 "--adapter", str(wide), "--device", "cpu", "--out", str(out / "x.csv"), "--sr", str(out / "x.dcm")])
    err = capsys.readouterr().err
    assert code == 2 and "'site-a' and 'wide' cannot be combined" in err and "patch spec" in err
    assert "Traceback" not in err and tree_digest(tmp_path) == before
    code = main(["score", "--volume", str(lidc_0001), "--points", str(xml), "--adapter", str(members["site-a"]),
                 "--adapter", str(members["site-a"]), "--device", "cpu"])
    assert code == 2 and "also named 'site-a'" in capsys.readouterr().err


# --- Slicer logic on a real MRML scene (slicer-core) ----------------------------------------------------
def _slicer_scene():
    pytest.importorskip("slicer")
    from MedLoRALib.slicer import mrml, selftest

    headless = mrml.create_headless_scene()
    (pair,) = selftest.build_scene(headless.scene, cases=1)
    return headless, pair


def _module_logic(scene, tmp_path, members, names):
    import sys
    from pathlib import Path

    from MedLoRALib.adapters.store import AdapterStore
    from MedLoRALib.slicer.module_logic import ModuleLogic

    logic = ModuleLogic(scene, store=AdapterStore(tmp_path / "store"), workDir=str(tmp_path / "work"),
                        libraryRoot=str(Path(__file__).resolve().parents[1]))
    config = logic.session.engine.config
    config.python, config.extra_args = sys.executable, ["--device", "cpu"]
    config.env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    for name in names:
        assert logic.importAdapter(str(members[name])) == name
    return logic


def test_results_table_holds_spread_disagree_and_members_and_reads_back(tmp_path):
    pytest.importorskip("slicer")
    from MedLoRALib.slicer import mrml, results

    headless = mrml.create_headless_scene()  # a real MRML scene; no volume needed for the table
    ensemble = results.ScoreRow(volume="v", nodule="n1", point_id="p1", r=1.0, a=2.0, s=3.0, probability=0.55,
                                label=1, adapter="site-a+site-b", adapter_version="x+y", spread=0.25,
                                disagree=True, members={"site-a": 0.8, "site-b": 0.3})
    single = results.ScoreRow(volume="v", nodule="n2", point_id="p2", r=4.0, a=5.0, s=6.0, probability=0.2,
                              label=0, adapter="site-a", adapter_version="x")
    table = results.write_table(headless.scene, [ensemble, single])
    titles = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert {"Spread", "Disagree", "P site-a", "P site-b"} <= set(titles)
    column = table.GetTable().GetColumnByName
    assert column("Spread").GetValue(0) == 0.25 and np.isnan(column("Spread").GetValue(1))
    assert [column("Disagree").GetValue(i) for i in range(2)] == ["yes", ""]
    assert column("P site-b").GetValue(0) == 0.3 and np.isnan(column("P site-b").GetValue(1))
    assert results.read_table(table) == [ensemble, single]
    assert results.score_suffix(ensemble) == "55% ±25 site-a+site-b (disagree)"
    assert results.base_label("n1 · " + results.score_suffix(ensemble)) == "n1"
    exported = list(csv.DictReader(results.export_csv([ensemble, single], tmp_path / "r.csv").open(newline="")))
    assert [(r["spread"], r["disagree"], r["p_site-a"], r["p_site-b"]) for r in exported] == [
        ("0.250000", "1", "0.800000", "0.300000"), ("", "", "", "")]


def test_slicer_logic_refuses_a_mismatched_set_before_the_engine_starts(members, tmp_path):
    headless, (volume, markups) = _slicer_scene()
    wide, _ = save_tiny_adapter(tmp_path / "in", "wide", PatchSpec(views="ortho3", fov_mm=64.0, pixels=32), seed=4)
    logic = _module_logic(headless.scene, tmp_path, {**members, "wide": wide}, ["site-a", "site-b", "wide"])
    try:
        assert "Ensemble of 2 adapters (site-a, site-b)" in logic.ensembleInfo(["site-a", "site-b"])
        with pytest.raises(AdapterError, match=r"'site-a' and 'wide' cannot be combined.*patch spec"):
            logic.ensembleInfo(["site-a", "wide"])
        with pytest.raises(AdapterError, match=r"'site-a' and 'wide' cannot be combined"):
            logic.beginScore(volume, markups, ["site-a", "wide"], device="cpu")
        assert logic.job is None and not logic.session.engine.is_running()
    finally:
        logic.close()


@pytest.mark.slow
def test_slicer_logic_scores_an_ensemble_through_the_engine_into_the_table(members, tmp_path):
    from MedLoRALib.slicer import results
    from MedLoRALib.slicer.scoring import cut_patches

    headless, (volume, markups) = _slicer_scene()
    logic = _module_logic(headless.scene, tmp_path, members, ["site-a", "site-b"])
    try:
        logic.beginScore(volume, markups, ["site-a", "site-b"], tta=False, device="cpu")
        job = None
        for _ in range(3000):
            job = logic.tick()
            if job is not None:
                break
            time.sleep(0.02)
        assert job is not None and not job.error, logic.jobStatus()
        rows, table = job.rows, job.results_table
    finally:
        logic.close()
    titles = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert titles[-2:] == ["P site-a", "P site-b"] and {"Spread", "Disagree"} <= set(titles)
    assert results.read_table(table) == rows and len(rows) == markups.GetNumberOfControlPoints() == 4
    engine = ScoringEngine(device="cpu")
    for name in ("site-a", "site-b"):
        engine.attach_adapter(members[name])
    patches = cut_patches(volume, markups, SPEC).patches
    alone = _alone(engine, ["site-a", "site-b"], patches)
    np.testing.assert_allclose([[r.members[n] for r in rows] for n in ("site-a", "site-b")], alone, atol=1e-5)
    np.testing.assert_allclose([r.probability for r in rows], alone.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose([r.spread for r in rows], alone.std(axis=0), atol=1e-5)
    assert [r.disagree for r in rows] == ((alone >= 0.5).any(0) & ~(alone >= 0.5).all(0)).tolist()
    assert all(r.adapter == "site-a+site-b" for r in rows)
    label = markups.GetNthControlPointLabel(0)
    assert f"{round(100 * rows[0].probability)}% ±{round(100 * rows[0].spread)} site-a+site-b" in label


def test_sr_refuses_ensemble_results_that_do_not_fit_their_members(tmp_path):
    pytest.importorskip("highdicom")
    from MedLoRALib.adapters import AdapterManifest
    from MedLoRALib.image import StudyIds
    from MedLoRALib.nodule import Nodule
    from MedLoRALib.report.sr import SeriesRef, SRError, write_score_sr

    a = AdapterManifest(name="a", backbone="medlora_tiny", backbone_sha256="ab" * 32, lora={"rank": 4})
    b = AdapterManifest(name="b", backbone="medlora_tiny", backbone_sha256="ab" * 32, lora={"rank": 4})
    series = SeriesRef(StudyIds(series_uid="1.2.3"), source=str(tmp_path))
    nodules = [Nodule(centre_lps=(1.0, 2.0, 3.0), nodule_id="n1")]
    good = {"probability": 0.5, "label": "malignant", "spread": 0.1, "disagree": True,
            "members": [{"adapter": "a", "probability": 0.4}, {"adapter": "b", "probability": 0.6}]}
    out = tmp_path / "sr.dcm"
    cases = {
        "not an ensemble result": {k: v for k, v in good.items() if k != "spread"},
        r"members are not the adapters \['a', 'b'\]": {**good, "members": good["members"][::-1]},
        "member without a probability": {**good, "members": [good["members"][0], {"adapter": "b"}]},
    }
    for message, result in cases.items():
        with pytest.raises(SRError, match=message):
            write_score_sr(out, series, nodules, [result], [a, b])
    wide = AdapterManifest.from_dict({**b.to_dict(), "patch_spec": PatchSpec(pixels=48).to_dict()})
    with pytest.raises(AdapterError, match="'a' and 'b' cannot be combined"):
        write_score_sr(out, series, nodules, [good], [a, wide])
    assert not out.exists()
