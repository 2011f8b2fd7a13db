"""The adapter's default test-time augmentation: recorded in its manifest, used wherever TTA is on.

``tta=True`` scores with the attached adapter's own set (ensembles: each member its own), an
adapter whose manifest records none scores with ``d8`` exactly as before, an explicit set or count
overrides, and every result, report and SR names the set that was used.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from helpers import save_tiny_adapter

from MedLoRALib.adapters import AdapterManifest, read_manifest
from MedLoRALib.adapters.manifest import manifest_sha256
from MedLoRALib.adapters.package import save_adapter
from MedLoRALib.engine import ScoringEngine
from MedLoRALib.errors import AdapterError, DatasetError, MedLoRAError
from MedLoRALib.models import LoraSpec
from MedLoRALib.nodule import Nodule
from MedLoRALib.patches import PatchSpec
from MedLoRALib.report.sr import SRError, _member_tta_sets, algorithm_parameters, ensemble_parameters
from MedLoRALib.serve import EngineServer
from MedLoRALib.training.config import TrainConfig, options
from MedLoRALib.tta import NEW_ADAPTER_TTA, TTA_SETS, TTAError, member_tta_sets, parse_tta_option, resolve_tta

torch.set_num_threads(1)  # a busy 2-core CI machine: more threads only contend
SPEC = PatchSpec(views="ortho3", pixels=32)  # fast: one 32 px image per nodule
PATCHES = np.random.default_rng(4).random((3, 3, 32, 32), dtype=np.float32)
TRAINED = dict(name="a", backbone="medlora_tiny", backbone_sha256="ab" * 32, lora={"rank": 4})


def _logits(results):
    return np.array([r["logit"] for r in results])


@pytest.fixture
def engine(tmp_path):
    from MedLoRALib.adapters.store import AdapterStore

    return ScoringEngine(device="cpu", store=AdapterStore(tmp_path / "store"))


# --- the manifest -----------------------------------------------------------------------------------
def test_manifest_records_its_set_and_older_manifests_load_as_d8(tmp_path):
    recorded = AdapterManifest(**TRAINED, tta="rot4")
    again = AdapterManifest.from_dict(json.loads(recorded.to_json()))
    assert again.tta == "rot4" and again.default_tta == "rot4" and again.to_dict()["tta"] == "rot4"

    old = {k: v for k, v in AdapterManifest(**TRAINED).to_dict().items()}
    assert "tta" not in old  # an adapter without a set writes the manifest it always wrote ...
    loaded = AdapterManifest.from_dict(old)
    assert loaded.tta is None and loaded.default_tta == "d8"  # ... and scores with all eight, as before
    assert manifest_sha256(loaded) == manifest_sha256(AdapterManifest.from_dict(dict(old)))
    assert manifest_sha256(loaded) != manifest_sha256(recorded)  # the set is part of what the hash names

    path, _ = save_tiny_adapter(tmp_path, "saved", SPEC, manifest={"tta": "flip2"})
    assert read_manifest(path).default_tta == "flip2"  # through the adapter folder and its checksums

    for bad in ("D8", "rot3", 4, ""):
        with pytest.raises(AdapterError, match=r"tta .* is not one of MedLoRA's sets: d8, rot4"):
            AdapterManifest.from_dict({**old, "tta": bad}, "bad.json")


# --- the engine ----------------------------------------------------------------------------------
def test_tta_true_scores_with_the_adapters_own_set(tmp_path, engine):
    rot4, model = save_tiny_adapter(tmp_path, "rot4-adapter", SPEC, seed=1, manifest={"tta": "rot4"})
    old = save_adapter(model, AdapterManifest(name="old-adapter"), tmp_path / "old")  # same weights, no set
    engine.attach_adapter(rot4)
    engine.attach_adapter(old)

    default = engine.score_patches(PATCHES, "rot4-adapter")
    assert np.array_equal(_logits(default), _logits(engine.score_patches(PATCHES, "rot4-adapter", tta="rot4")))
    assert not np.allclose(_logits(default), _logits(engine.score_patches(PATCHES, "rot4-adapter", tta="d8")))
    assert {r["tta"] for r in default} == {"rot4"}
    assert engine.tta_set(True, "rot4-adapter") == "rot4" and engine.tta_set(True, "old-adapter") == "d8"

    # an explicit set or count overrides the adapter's own; False is none
    for setting, name in (("d8", "d8"), (8, "d8"), ("flip2", "flip2"), (False, "none"), (1, "none")):
        results = engine.score_patches(PATCHES, "rot4-adapter", tta=setting)
        assert {r["tta"] for r in results} == {name}
        assert np.array_equal(_logits(results), _logits(engine.score_patches(PATCHES, "old-adapter", tta=name)))

    # the adapter without a set: exactly the d8 it scored with before
    before = engine.score_patches(PATCHES, "old-adapter")
    assert {r["tta"] for r in before} == {"d8"}
    assert np.array_equal(_logits(before), _logits(engine.score_patches(PATCHES, "rot4-adapter", tta="d8")))

    with pytest.raises(TTAError, match="unknown test-time augmentation 'rot3'"):
        engine.score_patches(PATCHES, "rot4-adapter", tta="rot3")


def test_ensemble_members_each_score_with_their_own_set(tmp_path, engine):
    names = {"m-rot4": "rot4", "m-old": "d8"}
    for seed, name in enumerate(names, start=1):
        manifest = {"tta": "rot4"} if name == "m-rot4" else {}
        engine.attach_adapter(save_tiny_adapter(tmp_path, name, SPEC, seed=seed, manifest=manifest)[0])
    results = engine.score_patches_ensemble(PATCHES, list(names))
    for index, (name, own) in enumerate(names.items()):
        alone = engine.score_patches(PATCHES, name, tta=own)
        assert [r["members"][index]["probability"] for r in results] == [a["probability"] for a in alone]
        assert {r["members"][index]["tta"] for r in results} == {own}
    assert {r["tta"] for r in results} == {"rot4+d8"}
    forced = engine.score_patches_ensemble(PATCHES, list(names), tta="flip2")
    assert {r["tta"] for r in forced} == {"flip2"}
    assert [r["members"][1]["probability"] for r in forced] == [
        a["probability"] for a in engine.score_patches(PATCHES, "m-old", tta="flip2")]


def test_ensemble_sharing_blocks_still_shares_them_when_sets_agree(tmp_path, engine):
    """Members with LoRA on the last block only share the first blocks; with one set they still do."""
    lora = LoraSpec(rank=4, last_n_blocks=1)
    for seed, name in enumerate(("s1", "s2"), start=1):
        engine.attach_adapter(save_tiny_adapter(tmp_path, name, SPEC, seed=seed, lora=lora,
                                                manifest={"tta": "rot4"})[0])
    assert engine.shared_prefix_blocks(["s1", "s2"]) > 0
    results = engine.score_patches_ensemble(PATCHES, ["s1", "s2"])
    alone = engine.score_patches(PATCHES, "s2", tta="rot4")
    assert np.allclose([r["members"][1]["logit"] for r in results], _logits(alone), rtol=0, atol=1e-6)
    assert {r["tta"] for r in results} == {"rot4"}


# --- medlora serve -------------------------------------------------------------------------------
def test_serve_true_means_the_adapters_set_and_results_say_which(tmp_path, engine):
    path, _ = save_tiny_adapter(tmp_path, "served", SPEC, seed=2, manifest={"tta": "rot2"})
    server = EngineServer(engine, lambda line: None)
    assert server.handle(json.dumps({"id": 1, "op": "attach_adapter", "path": str(path)}))["ok"]
    blob = {"dtype": "float32", "shape": list(PATCHES.shape), "data": base64.b64encode(PATCHES.tobytes()).decode()}
    for setting, name in ((True, "rot2"), (False, "none"), ("d8", "d8"), (4, "rot4")):
        reply = server.handle(json.dumps({"id": 2, "op": "score", "patches": blob, "tta": setting}))
        assert reply["ok"] and {r["tta"] for r in reply["result"]["results"]} == {name}
        assert _logits(reply["result"]["results"]).tolist() == _logits(engine.score_patches(PATCHES, tta=name)).tolist()
    for setting, shown in (("rot3", "'rot3'"), (0, "0"), ("true", "'true'"), (None, "None"), (4.0, "4.0"),
                           ("x" * 100_000, "'xxxx")):
        bad = server.handle(json.dumps({"id": 3, "op": "score", "patches": blob, "tta": setting}))
        message = bad["error"]["message"]
        assert not bad["ok"] and bad["error"]["type"] == "ProtocolError" and "rot4" in message, bad
        assert f"test-time augmentation {shown}" in message and len(message) < 400, message  # said once, cut short


def test_the_slicer_client_refuses_a_bad_setting_before_any_engine_starts():
    from MedLoRALib.slicer.engine_client import EngineClient

    class NoRunner:
        def start(self, *args, **kwargs):
            raise AssertionError("a bad tta must not start the engine")

    client = EngineClient(runner=NoRunner())
    for bad in (None, 4.5, "eight", 0):
        with pytest.raises(TTAError, match="unknown test-time augmentation"):
            client.score(PATCHES, tta=bad)
    from MedLoRALib.slicer.engine_client import tta_param

    sent = [json.dumps(tta_param(setting)) for setting in (True, False, "rot4", np.int64(4))]
    assert sent == ["true", "false", '"rot4"', "4"]  # what ScoreJob and the client put in the request


# --- medlora train --------------------------------------------------------------------------------
def test_train_config_records_a_checked_set_and_passes_it_on_the_command_line(tmp_path):
    assert TrainConfig().tta == NEW_ADAPTER_TTA in TTA_SETS
    other = next(name for name in TTA_SETS if name != NEW_ADAPTER_TTA)
    config = TrainConfig(manifest=tmp_path / "m.csv", out=tmp_path / "adapter", tta=other)
    args = config.cli_args()
    assert args[args.index("--tta") + 1] == other  # Slicer launches training with these arguments
    assert "--tta" not in TrainConfig(manifest=tmp_path / "m.csv", out=tmp_path / "adapter").cli_args()

    import argparse

    from MedLoRALib.cli.train import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert build_config(parser.parse_args(args)).tta == other
    assert build_config(parser.parse_args(["--manifest", "m.csv", "--out", "a"])).tta == NEW_ADAPTER_TTA
    with pytest.raises(DatasetError, match=r"--tta 'eight' is not one of MedLoRA's sets: d8, rot4"):
        build_config(parser.parse_args(["--manifest", "m.csv", "--out", "a", "--tta", "eight"]))
    assert any(opt.flag == "--tta" for opt in options())


# --- names, counts and the SR's record -------------------------------------------------------------
def test_settings_resolve_to_set_names():
    assert resolve_tta(True, "rot4") == "rot4" and resolve_tta(True) == "d8" and resolve_tta(False, "rot4") == "none"
    assert resolve_tta(np.int64(4)) == "rot4" and resolve_tta("flip4", "rot4") == "flip4"
    assert parse_tta_option("rot4") == "rot4" and parse_tta_option("2") == "flip2"
    for bad in ("3", "", "ROT4", "true"):
        with pytest.raises(TTAError):
            parse_tta_option(bad)
    assert member_tta_sets("rot4+d8", 2) == ["rot4", "d8"] and member_tta_sets("d8", 3) == ["d8"] * 3
    with pytest.raises(TTAError, match="names 2 sets for 3 adapters"):
        member_tta_sets("rot4+d8", 3)
    with pytest.raises(MedLoRAError):
        resolve_tta(True, "bogus")  # an adapter's own set is checked too


def test_sr_records_the_set_used():
    own = AdapterManifest(**TRAINED, tta="rot4")
    old = AdapterManifest(**{**TRAINED, "name": "b"})
    assert "tta=rot4" in algorithm_parameters(own, True) and "tta=d8" in algorithm_parameters(old, True)
    assert "tta=none" in algorithm_parameters(own, False) and "tta=flip2" in algorithm_parameters(own, "flip2")
    assert not any(p.startswith("tta=") for p in algorithm_parameters(own))  # not given: not claimed
    assert "tta=rot4+d8" in ensemble_parameters([own, old], True)

    # what the results record wins over the call's setting; a single result's and an ensemble's
    assert _member_tta_sets([{"tta": "flip4"}], [own], True) == ["flip4"]
    assert _member_tta_sets([{"probability": 0.5}], [own], True) == ["rot4"]
    assert _member_tta_sets([{"probability": 0.5}], [own], None) is None
    ensemble_result = {"tta": "rot4+d8", "members": [{"adapter": "a"}, {"adapter": "b"}]}
    assert _member_tta_sets([ensemble_result], [own, old], None) == ["rot4", "d8"]
    with pytest.raises(SRError, match="different test-time augmentation sets"):
        _member_tta_sets([{"tta": "rot4"}, {"tta": "d8"}], [own], None)
    with pytest.raises(SRError, match="'eight' is not one of MedLoRA's sets"):
        _member_tta_sets([{"tta": "eight"}], [own], None)
    unrecorded = {"probability": 0.5, "members": [{"adapter": "a"}, {"adapter": "b"}]}
    for setting in (["rot4", "d8"], 0, "true"):  # a call's setting is one value (a list came as 'rot4+d8' each)
        with pytest.raises(SRError, match="unknown test-time augmentation"):
            _member_tta_sets([unrecorded], [own, old], setting)


# --- 3D Slicer: the rows and the results table say the set; the SR export passes it on --------------
def test_slicer_rows_and_table_record_the_set_and_older_tables_still_read():
    pytest.importorskip("slicer")
    from MedLoRALib.slicer import mrml, results
    from MedLoRALib.slicer.scoring import PatchBatch, rows_from_results
    from MedLoRALib.slicer.sr_export import _result

    points = [mrml.ScenePoint(index=i, point_id=str(i), name=f"n{i}", position_ras=(float(i), 0.0, 0.0),
                              nodule=Nodule((-float(i), 0.0, 0.0))) for i in range(2)]
    batch = PatchBatch("ct", points, np.array([True, True]), np.zeros((2, 3, 32, 32), np.float32))
    engine_results = [{"probability": p, "label": "benign", "adapter": "a", "adapter_version": "v", "tta": "rot4"}
                      for p in (0.2, 0.3)]
    rows = rows_from_results(batch, engine_results, "a", "v")
    assert [row.tta for row in rows] == ["rot4", "rot4"]
    assert _result(rows[0], ["a"])["tta"] == "rot4"  # what the SR child is told

    scene = mrml.create_headless_scene().scene
    table = results.write_table(scene, rows)
    assert results.read_table(table) == rows
    table.GetTable().RemoveColumnByName("TTA")  # a table saved before the set was recorded
    old = results.read_table(table)
    assert [row.tta for row in old] == ["", ""] and [row.probability for row in old] == [0.2, 0.3]
    assert "tta" not in _result(old[0], ["a"])  # not recorded: the SR then claims no set


def test_a_merged_adapter_keeps_its_parents_common_set():
    from types import SimpleNamespace

    from MedLoRALib.adapters.merge import merged_manifest

    def parents(*sets):
        return [SimpleNamespace(manifest=AdapterManifest(**{**TRAINED, "name": f"p{i}"}, tta=tta))
                for i, tta in enumerate(sets)]

    def merged(*sets):
        return merged_manifest(parents(*sets), LoraSpec(rank=4), {"method": "avg"}, "merged")

    assert merged("rot4", "rot4").default_tta == "rot4"
    assert merged("rot4", None).tta is None and merged("rot4", "flip2").default_tta == "d8"  # no common set: all 8
