"""``medlora demo`` end to end at a reduced size, its reuse of earlier work, and its guard rails."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from MedLoRALib.errors import MedLoRAError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One reduced demo run (6 + 2 phantom studies, 1 epoch), shared by the tests below."""
    import torch

    from MedLoRALib.demo import DemoConfig, run_demo

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("demo") / "report"
    lines: list[str] = []
    result = run_demo(DemoConfig.quick(out, progress="none"), say=lines.append)
    return result, lines


@pytest.mark.slow
def test_quick_demo_writes_every_report_file(quick_demo):
    result, _ = quick_demo
    out = result.out
    for name in ("results.csv", "metrics.json", "roc.png", "summary.txt", "adapter/manifest.json",
                 "adapter/training_curves.png", "adapter/roc.png", "adapter/metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "cohort" / "heldout" / "manifest.csv", newline="") as handle:
        heldout = list(csv.DictReader(handle))
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(heldout) == 2 * 4  # one row per held-out nodule
    assert [r["nodule_id"] for r in rows] == [h["nodule_id"] for h in heldout]
    for row, truth in zip(rows, heldout):
        assert 0.0 <= float(row["probability"]) <= 1.0
        assert 0.0 <= float(row["shortcut_probability"]) <= 1.0
        assert row["predicted"] in ("benign", "malignant")
        assert int(row["true_label"]) == int(truth["label"])
        assert math.isclose(float(row["x_lps"]), float(truth["x"]), abs_tol=1e-3)
        assert (out / row["image"]).is_file()  # relative to the report folder, in the held-out cohort
        assert row["image"].startswith("cohort/heldout/")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic_data"] is True and metrics["backbone"]["random_init"] is False
    assert "stand-in" in metrics["backbone"]["description"]
    held = metrics["heldout"]
    assert held["adapter"]["n"] == 8 and held["adapter"]["n_positive"] == sum(int(r["true_label"]) for r in rows)
    for block in (held["adapter"], held["shortcut_baseline"], metrics["validation"]["adapter"],
                  metrics["validation"]["shortcut_baseline"]):
        assert block["auc"] is None or 0.0 <= block["auc"] <= 1.0
    probabilities = np.array([float(r["probability"]) for r in rows])
    assert probabilities.std() > 0  # the model distinguishes nodules at all


@pytest.mark.slow
def test_quick_demo_says_synthetic_stand_in_and_shortcut(quick_demo):
    result, lines = quick_demo
    text = "\n".join(lines)
    assert "SYNTHETIC" in text and "not patients" in text
    assert "stand-in, NOT a real pretrained large vision model" in text
    auc_lines = [line for line in lines if "AUC" in line]
    assert len(auc_lines) == 2 and all("shortcut baseline (diameter + mean HU) AUC" in line for line in auc_lines)
    summary = (result.out / "summary.txt").read_text()
    assert "SYNTHETIC DATA, NOT A CLINICAL RESULT" in summary and "shortcut baseline" in summary
    assert "demo finished in" in lines[-1]


@pytest.mark.slow
def test_rerun_reuses_cohort_and_adapter_through_the_cli(quick_demo, capsys):
    from MedLoRALib.cli import main

    result, _ = quick_demo
    out = result.out
    volume = out / "cohort" / "train" / "SYN-0001.nrrd"
    adapter_manifest = out / "adapter" / "manifest.json"
    stamps = volume.stat().st_mtime_ns, adapter_manifest.stat().st_mtime_ns
    before = (out / "results.csv").read_text()
    assert main(["demo", "--quick", "--out", str(out), "--progress", "none", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 3  # two cohorts and the adapter
    assert "training a LoRA adapter" not in printed
    assert (volume.stat().st_mtime_ns, adapter_manifest.stat().st_mtime_ns) == stamps
    assert (out / "results.csv").read_text() == before  # scoring is deterministic


def test_cohort_is_regenerated_only_when_its_settings_change(tmp_path):
    from MedLoRALib.demo import ensure_cohort

    said: list[str] = []
    folder = tmp_path / "cohort"
    first = ensure_cohort(folder, 1, seed=5, nodules_per_case=2, say=said.append)
    mtime = (folder / "SYN-0001.nrrd").stat().st_mtime_ns
    assert ensure_cohort(folder, 1, seed=5, nodules_per_case=2, say=said.append) == first
    assert said[-1].startswith("reusing") and (folder / "SYN-0001.nrrd").stat().st_mtime_ns == mtime
    ensure_cohort(folder, 1, seed=6, nodules_per_case=2, say=said.append)
    assert said[-1].startswith("generated")
    with open(folder / "manifest.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    (folder / "my-notes.txt").write_text("not the demo's")
    with pytest.raises(MedLoRAError, match="did not write"):
        ensure_cohort(folder, 2, seed=6, nodules_per_case=2, say=said.append)
    assert (folder / "my-notes.txt").is_file()


def test_shortcut_baseline_learns_what_size_and_density_give():
    from MedLoRALib.demo import shortcut_probabilities

    rng = np.random.default_rng(0)
    diameters = rng.uniform(5, 25, 200)
    labels = (diameters > 15).astype(int)
    features = np.column_stack([diameters, rng.normal(0, 50, 200)])
    probabilities = shortcut_probabilities(features[:100], labels[:100], features[100:])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels[100:], probabilities) > 0.95


def test_bad_settings_are_clear_errors(tmp_path):
    from MedLoRALib.demo import DemoConfig

    with pytest.raises(MedLoRAError, match="train_cases must be ≥ 4"):
        DemoConfig(out=tmp_path, train_cases=1)
    with pytest.raises(MedLoRAError, match="pretrain_tiny_backbone.py"):
        DemoConfig(out=tmp_path, weights=tmp_path / "missing.safetensors")
    assert DemoConfig(out=tmp_path, weights=tmp_path / "missing.safetensors", random_init=True).random_init
