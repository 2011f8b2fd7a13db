"""Merging LoRA adapters (``adapters.merge``, ``medlora adapters merge``): the merged update is the
intended combination of the parents', the manifest names its parents, bad sets and bad outputs are
refused, and the merged adapter scores through the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tree_digest

from MedLoRALib.adapters.archive import read_checked
from MedLoRALib.adapters.manifest import AdapterManifest, manifest_sha256
from MedLoRALib.adapters.merge import lora_scale, lora_updates, merge_adapters
from MedLoRALib.adapters.package import lora_spec_of
from MedLoRALib.cli import main
from MedLoRALib.errors import AdapterError, OutputError
from MedLoRALib.models import LoraSpec
from MedLoRALib.patches import PatchSpec

SPEC = PatchSpec(views="axial", fov_mm=50.0, pixels=32)


@pytest.fixture(scope="module")
def parents(tiny_adapter):
    """Three tiny LoRA adapters (rank 8, q and v) with different weights and thresholds."""
    return [tiny_adapter(f"site{i}", SPEC, seed=10 + i, scale=0.3, manifest={"threshold": 0.3 + 0.1 * i})
            for i in range(3)]


def _updates(path):
    return lora_updates(read_checked(path))


def _heads(path):
    from safetensors.torch import load

    return load(read_checked(path).contents["head.safetensors"])


def test_avg_is_the_mean_of_the_updates_not_of_a_and_b(parents, tmp_path):
    exact = merge_adapters(parents, tmp_path / "exact", method="avg", rank=24)  # Σ ranks: no truncation
    merged, each = _updates(exact), [_updates(p) for p in parents]
    naive_gap = 0.0
    for layer, delta in merged.items():
        mean = torch.stack([u[layer] for u in each]).mean(dim=0)
        assert torch.allclose(delta, mean, atol=1e-5 * float(mean.abs().max()) + 1e-7), layer
        # averaging A and B separately would give another update
        states = [read_checked(p) for p in parents]
        from safetensors.torch import load
        a = torch.stack([load(s.contents["lora/adapter_model.safetensors"])[f"{layer}.lora_A.weight"]
                         for s in states]).double().mean(0)
        b = torch.stack([load(s.contents["lora/adapter_model.safetensors"])[f"{layer}.lora_B.weight"]
                         for s in states]).double().mean(0)
        naive_gap = max(naive_gap, float((b @ a * lora_scale(LoraSpec()) - mean).norm() / mean.norm()))
    assert naive_gap > 0.3
    assert json.loads((exact / "manifest.json").read_text())["merge"]["relative_truncation_error"]["overall"] < 1e-6


def test_avg_at_the_parents_rank_is_the_best_rank_r_approximation_and_reports_its_error(parents, tmp_path):
    out = merge_adapters(parents, tmp_path / "r8", method="avg")
    record = json.loads((out / "manifest.json").read_text())["merge"]
    assert record["rank"] == 8 and lora_spec_of(read_checked(out).manifest).rank == 8
    merged, each = _updates(out), [_updates(p) for p in parents]
    errors = []
    for layer, delta in merged.items():
        mean = torch.stack([u[layer] for u in each]).mean(dim=0)
        u, s, vh = torch.linalg.svd(mean)
        best = (u[:, :8] * s[:8]) @ vh[:8]
        assert torch.allclose(delta, best, atol=1e-5 * float(best.abs().max())), layer
        errors.append(float((mean - delta).norm() / mean.norm()))
    assert record["relative_truncation_error"]["max_layer"] == pytest.approx(max(errors), rel=1e-3)
    assert 0.05 < max(errors) < 1.0  # three random rank-8 updates do not fit in rank 8


def test_parents_of_different_rank_and_alpha_merge_by_their_own_scale(parents, tiny_adapter, tmp_path):
    small = tiny_adapter("rank4", SPEC, seed=20, scale=0.3, lora=LoraSpec(rank=4, alpha=4.0, use_rslora=True))
    out = merge_adapters([parents[0], small], tmp_path / "mixed", rank=12)  # 8 + 4: exact
    assert lora_spec_of(read_checked(out).manifest).rank == 12
    merged, each = _updates(out), [_updates(parents[0]), _updates(small)]
    for layer, delta in merged.items():
        mean = (each[0][layer] + each[1][layer]) / 2
        assert torch.allclose(delta, mean, atol=1e-5 * float(mean.abs().max())), layer


def _ties_reference(updates: list[np.ndarray], density: float) -> np.ndarray:
    """TIES (Yadav et al. 2023) written out: trim to the top ``density`` magnitudes, elect the sign of the
    summed trimmed mass, average the entries that agree with it."""
    trimmed = []
    for u in updates:
        keep = int(density * u.size)
        cut = np.sort(np.abs(u).ravel())[::-1][keep - 1]
        trimmed.append(np.where(np.abs(u) >= cut, u, 0.0))
    stacked = np.stack(trimmed)
    sign = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == sign
    return (stacked * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def test_ties_is_peft_ties_on_the_updates(parents, tmp_path):
    out = merge_adapters(parents, tmp_path / "ties", method="ties", density=0.3, rank=96)  # full rank: exact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merge"]["method"] == "ties" and manifest["merge"]["density"] == 0.3
    merged, each = _updates(out), [_updates(p) for p in parents]
    for layer, delta in merged.items():
        expected = _ties_reference([u[layer].numpy() for u in each], 0.3)
        assert np.allclose(delta.numpy(), expected, atol=1e-5 * np.abs(expected).max()), layer
        mean = torch.stack([u[layer] for u in each]).mean(dim=0).numpy()
        assert not np.allclose(expected, mean, atol=1e-3 * np.abs(mean).max())  # sign election did something


def test_heads_are_averaged_and_the_manifest_names_its_parents(parents, tmp_path):
    out = merge_adapters(parents, tmp_path / "m", method="ties", name="consortium")
    merged = read_checked(out).manifest
    heads = [_heads(p) for p in parents]
    for key, value in _heads(out).items():
        assert torch.allclose(value, torch.stack([h[key] for h in heads]).mean(0), atol=1e-6), key
    given = [read_checked(p).manifest for p in parents]
    assert merged.name == "consortium"
    assert merged.parents == [{"name": m.name, "version_id": m.version_id, "manifest_sha256": manifest_sha256(m)}
                              for m in given]
    assert merged.threshold == pytest.approx(np.mean([m.threshold for m in given]))
    assert merged.metrics == {} and "not validated" in merged.training["note"]
    assert (out / ".medlora-output").is_file()


def test_manifests_without_parents_still_load(parents):
    data = read_checked(parents[0]).manifest.to_dict()
    assert "parents" not in data and "merge" not in data  # an ordinary adapter's manifest (and hash) as before
    old = AdapterManifest.from_dict(data)
    assert old.parents == [] and old.merge is None
    bad = {**data, "parents": [{"name": "x", "version_id": "1"}]}
    with pytest.raises(AdapterError, match="manifest_sha256"):
        AdapterManifest.from_dict(bad)


def test_merged_adapter_scores_through_the_engine_with_the_merged_update(parents, tmp_path):
    from MedLoRALib.engine import ScoringEngine

    out = merge_adapters(parents, tmp_path / "exact", method="avg", rank=24)
    engine = ScoringEngine(device="cpu")
    engine.attach_adapter(out)
    patches = np.random.default_rng(0).uniform(-1000, 400, (3, *SPEC.shape)).astype(np.float32)
    results = engine.score_patches(patches, tta=False)
    assert [r["adapter"] for r in results] == ["exact"] * 3
    assert all(0.0 < r["probability"] < 1.0 for r in results)
    # the peft layers the engine built apply exactly the mean of the parents' updates
    each = [_updates(p) for p in parents]
    attached = engine._get("exact")
    peft, key = attached.backbone.peft, attached.lora_name
    checked = 0
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and key in getattr(module, "lora_A", {}):
            delta = (module.lora_B[key].weight @ module.lora_A[key].weight).double() * module.scaling[key]
            layer = f"base_model.model.{name.split('base_model.model.', 1)[-1]}"
            mean = torch.stack([u[layer] for u in each]).mean(0)
            assert torch.allclose(delta, mean, atol=1e-5 * float(mean.abs().max())), name
            checked += 1
    assert checked == 12


@pytest.mark.parametrize("case, message", [
    ("one", "at least two adapters"),
    ("twice", "given twice"),
    ("patch spec", "preprocessing"),
    ("targets", "adapt different layers"),
    ("linear", "'linear' adapter"),
    ("density", "--density"),
])
def test_incompatible_parents_are_refused_with_a_clear_error(parents, tiny_adapter, tmp_path, case, message):
    other = {"patch spec": lambda: tiny_adapter("wide", PatchSpec(views="axial", fov_mm=60.0, pixels=32), seed=3),
             "targets": lambda: tiny_adapter("qkv", SPEC, seed=4, lora=LoraSpec(targets="qkv")),
             "linear": lambda: tiny_adapter("probe", SPEC, seed=5, mode="linear")}
    given = {"one": [parents[0]], "twice": [parents[0], parents[1], parents[0]]}.get(case)
    if given is None:
        given = [parents[0], other[case]()] if case in other else parents
    options = {"density": 1.5, "method": "ties"} if case == "density" else {}
    with pytest.raises(AdapterError, match=message):
        merge_adapters(given, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_output_rules_foreign_folder_existing_adapter_inputs_and_zip(parents, tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = tree_digest(foreign)
    with pytest.raises(OutputError, match="not written by MedLoRA"):
        merge_adapters(parents[:2], foreign)
    assert tree_digest(foreign) == before
    with pytest.raises(OutputError, match="input of this run"):
        merge_adapters(parents[:2], parents[0])
    with pytest.raises(OutputError, match="as a folder"):
        merge_adapters(parents[:2], tmp_path / "m.zip")
    out = merge_adapters(parents[:2], tmp_path / "m")
    first = read_checked(out).manifest.version_id
    with pytest.raises(OutputError, match="--overwrite"):
        merge_adapters(parents[1:], out)
    assert read_checked(out).manifest.version_id == first
    merge_adapters(parents[1:], out, overwrite=True)
    assert read_checked(out).manifest.version_id != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "results"]  # no staging or lock left behind


def test_cli_merges_store_names_and_folders_and_reports_errors_in_one_line(parents, tmp_path, capsys):
    from MedLoRALib.adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    store.import_(parents[1], name="site1")
    code = main(["adapters", "merge", str(parents[0]), "site1", "--method", "ties", "--density", "0.4",
                 "--out", str(tmp_path / "merged"), "--name", "two-sites", "--store", str(store.root)])
    printed = capsys.readouterr().out
    assert code == 0 and "two-sites" in printed and "truncation error" in printed
    merged = read_checked(tmp_path / "merged").manifest
    assert [p["name"] for p in merged.parents] == ["site0", "site1"] and merged.merge["density"] == 0.4
    code = main(["adapters", "merge", str(parents[0]), "nosuch", "--out", str(tmp_path / "x"),
                 "--store", str(store.root)])
    err = capsys.readouterr().err
    assert code == 2 and "no adapter named 'nosuch'" in err and "Traceback" not in err
