"""``medlora experiment``: LoRA / full / linear on the same patient folds, one report.

The cohort is the TCIA-layout download of ``helpers.write_tcia_download`` (synthetic phantom
patients with LIDC XML plus the two real LIDC cases, symlinked) turned into a manifest by
``medlora cohort lidc``; the experiment is the tiny configuration, 1 epoch, 32 px patches, two
folds. DeLong's test is checked against a hand-computed example, the pair-counting definition
and the bootstrap.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest

from MedLoRALib.cli import main as medlora
from MedLoRALib.errors import DatasetError, MedLoRAError, OutputError
from MedLoRALib.experiment import ExperimentConfig
from MedLoRALib.experiment.folder import inspect_folder, read_state
from MedLoRALib.experiment.jobs import Job, read_result
from MedLoRALib.experiment.runner import JobRunner, Processes, load_cohort, make_folds, run_experiment
from MedLoRALib.locks import OutputLock
from MedLoRALib.training.metrics import bootstrap_auc_ci, delong_covariance, delong_test, roc_auc

REPO = Path(__file__).resolve().parents[1]
ARMS = ("lora_qv", "lora_all", "full", "linear")
FAST = ["--config", "tiny", "--folds", "2", "--epochs", "1", "--pixels", "32", "--bootstrap", "200",
        "--threads", "1"]
VARIES = {"wall_s", "train_loop_s", "wall_s_total", "wall_s_per_fold", "train_loop_s_total", "peak_memory_mib",
          "memory_increase_mib"}  # measurements of the machine, not of the model


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = medlora(argv)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def manifest(tcia_download, tmp_path_factory) -> Path:
    root, xml_root, _ = tcia_download
    out = tmp_path_factory.mktemp("cohort") / "lidc.csv"
    assert _run(["cohort", "lidc", "--root", str(root), "--xml-root", str(xml_root), "--out", str(out)])[0] == 0
    return out


@pytest.fixture(scope="module")
def experiment(manifest, tcia_download, tmp_path_factory):
    """(out, stderr) of a whole experiment: 2 folds × 4 arms."""
    before = tree_digest(tcia_download[0], manifest)
    out = tmp_path_factory.mktemp("exp") / "exp"
    code, err = _run(["experiment", "--manifest", str(manifest), "--out", str(out), *FAST])
    assert code == 0, err
    assert tree_digest(tcia_download[0], manifest) == before  # inputs untouched
    return out, err


@pytest.fixture(scope="module")
def cohort(manifest):
    """The manifest's training set as the experiment loads it (real volumes)."""
    return load_cohort(ExperimentConfig(manifest=manifest, out=manifest.parent / "unused", preset="tiny",
                                        pixels=32, folds=2))


def _arm_files(out: Path) -> dict[str, dict]:
    return {arm: json.loads((out / "report" / f"arm-{arm}.json").read_text()) for arm in ARMS
            if (out / "report" / f"arm-{arm}.json").exists()}


def _pooled(out: Path, arm: str, folds: int = 2):
    rows = sorted((v["index"], v["label"], v["logit"], v["patient_id"], r["fold"])
                  for k in range(1, folds + 1) for r in [read_result(out / "jobs" / f"fold{k}-{arm}")]
                  for v in r["validation"])
    return rows


def _without(d, keys=VARIES):
    if isinstance(d, dict):
        return {k: _without(v, keys) for k, v in d.items() if k not in keys}
    if isinstance(d, list):
        return [_without(v, keys) for v in d]
    return d


# --- the run ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_fold_and_arm_trained_with_progress(experiment):
    out, err = experiment
    for k in (1, 2):
        for arm in ARMS:
            assert f"[{(k - 1) * 4 + ARMS.index(arm) + 1}/8] fold{k}-{arm}: done in" in err
            record = read_result(out / "jobs" / f"fold{k}-{arm}")
            assert record["arm"] == arm and record["fold"] == k
            assert not (out / "jobs" / f"fold{k}-{arm}" / "adapter").exists()  # only with --keep-adapters
            events = [json.loads(line) for line in (out / "jobs" / f"fold{k}-{arm}" / "events.jsonl").open()]
            assert [e["event"] for e in events][0] == "start" and "epoch" in [e["event"] for e in events]
    assert "epoch 1/1: train loss" in err
    assert (out / ".medlora-output").is_file() and not (out / "jobs" / "fold1-full" / "adapter.checkpoint").exists()
    params = {arm: read_result(out / "jobs" / f"fold1-{arm}")["trainable_parameters"] for arm in ARMS}
    assert params["linear"] < params["lora_qv"] < params["lora_all"] < params["full"]


@pytest.mark.slow
def test_no_patient_in_two_folds(experiment, cohort):
    out, _ = experiment
    folds = read_state(out)["folds"]
    patients = [set(p) for p in folds.values()]
    assert not patients[0] & patients[1]
    assert patients[0] | patients[1] == set(cohort.patient_ids)
    for arm in ARMS:  # every nodule validated once, by the fold holding its patient
        rows = _pooled(out, arm)
        assert [r[0] for r in rows] == list(range(len(cohort.samples)))
        assert all(r[3] in folds[f"fold{r[4]}"] for r in rows)
    for split in make_folds(cohort, 2, 0)[0]:  # and never trained on by that fold's model
        train = {cohort.patient_ids[i] for i in split.train}
        assert not train & {cohort.patient_ids[i] for i in split.val}
        assert sorted({cohort.patient_ids[i] for i in split.val}) == folds[split.name]


@pytest.mark.slow
def test_report_numbers_match_the_arm_and_fold_files(experiment):
    out, _ = experiment
    arms = _arm_files(out)
    assert set(arms) == set(ARMS)
    md = (out / "report" / "report.md").read_text()
    for arm, s in arms.items():
        rows = _pooled(out, arm)
        labels, logits = [r[1] for r in rows], [r[2] for r in rows]
        assert s["auc"] == pytest.approx(roc_auc(labels, logits), abs=1e-12)
        assert s["auc_ci95"] == pytest.approx(list(bootstrap_auc_ci(labels, logits, n_boot=200, seed=0)))
        for f in s["folds"]:  # each fold is its fold × arm metrics file, and that file is its predictions
            record = read_result(out / "jobs" / f"fold{f['fold']}-{arm}")
            v = record["validation"]
            assert record["metrics"]["auc"] == pytest.approx(roc_auc([x["label"] for x in v], [x["logit"] for x in v]))
            assert record["metrics"]["auc_ci95"] == pytest.approx(list(bootstrap_auc_ci(
                [x["label"] for x in v], [x["logit"] for x in v], n_boot=200, seed=0)))
            assert (f["auc"], f["auc_ci95"], f["n"]) == (record["metrics"]["auc"], record["metrics"]["auc_ci95"], len(v))
            assert f["wall_s"] == record["wall_s"]
        assert s["trainable_parameters"] == read_result(out / "jobs" / f"fold1-{arm}")["trainable_parameters"]
        assert s["wall_s_total"] == pytest.approx(sum(f["wall_s"] for f in s["folds"]))
        # the markdown row is these numbers
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{s['auc']:.3f} (95% CI {s['auc_ci95'][0]:.3f}–{s['auc_ci95'][1]:.3f})"
        assert cells[2] == f"{s['fold_auc_mean']:.3f} ± {s['fold_auc_sd']:.3f}"
        assert cells[3].startswith(f"{s['trainable_parameters']:,} (")
        assert cells[4] == f"{s['train_loop_s_total']:.1f} s" and cells[5] == f"{s['wall_s_total']:.1f} s"
    with open(out / "report" / "folds.csv", newline="") as handle:
        folds = list(csv.DictReader(handle))
    assert len(folds) == 8
    for row in folds:
        f = arms[row["arm"]]["folds"][int(row["fold"]) - 1]
        assert float(row["auc"]) == pytest.approx(f["auc"]) and int(row["n"]) == f["n"]


@pytest.mark.slow
def test_delong_in_the_report_is_the_pooled_paired_test(experiment):
    out, _ = experiment
    report = json.loads((out / "report" / "report.json").read_text())
    md = (out / "report" / "report.md").read_text()
    full = _pooled(out, "full")
    assert [(t["a"], t["b"]) for t in report["comparisons"]] == [("lora_qv", "full"), ("lora_all", "full")]
    for t in report["comparisons"]:
        lora = _pooled(out, t["a"])
        assert [r[:2] for r in lora] == [r[:2] for r in full]  # the same nodules, paired
        expected = delong_test([r[1] for r in full], [r[2] for r in lora], [r[2] for r in full])
        assert t["p_value"] == pytest.approx(expected.p_value) and t["difference"] == pytest.approx(expected.difference)
        assert f"| {t['a']} − full | {t['difference']:+.3f} (95% CI {t['ci95'][0]:.3f}–{t['ci95'][1]:.3f}) |" in md
    from PIL import Image

    for name in ("roc.png", "calibration.png"):
        with Image.open(out / "report" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert set(report["files"]) == {p.name for p in (out / "report").iterdir()} - {"report.json"}


@pytest.mark.slow
def test_resume_skips_finished_jobs_and_redoes_an_unfinished_one(experiment, manifest, tmp_path):
    source, _ = experiment
    out = tmp_path / "exp"
    shutil.copytree(source, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/result.json")}
    code, err = _run(["experiment", "--manifest", str(manifest), "--out", str(out), *FAST, "--resume"])
    assert code == 0, err
    assert err.count("finished earlier, skipped") == 8 and ": training" not in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/result.json")} == stamps
    assert _without(_arm_files(out)) == _without(_arm_files(source))
    # a job killed after writing its adapter but before its result: trained again, to the same logits
    old = read_result(out / "jobs" / "fold2-lora_all")
    (out / "jobs" / "fold2-lora_all" / "result.json").unlink()
    code, err = _run(["experiment", "--manifest", str(manifest), "--out", str(out), *FAST, "--resume"])
    assert code == 0, err
    assert re.findall(r"(fold\d-\w+): training\n", err) == ["fold2-lora_all"]
    assert read_result(out / "jobs" / "fold2-lora_all")["validation"] == old["validation"]
    # without --resume an earlier experiment is refused, and left as it was; so is a second run at once
    before = tree_digest(out)
    code, err = _run(["experiment", "--manifest", str(manifest), "--out", str(out), *FAST])
    assert code == 2 and "pass --resume to continue it" in err
    with OutputLock(out, activity="written by medlora experiment"):
        code, err = _run(["experiment", "--manifest", str(manifest), "--out", str(out), *FAST, "--resume"])
    assert code == 2 and "is already being written by medlora experiment by process" in err
    assert tree_digest(out) == before


@pytest.mark.slow
def test_a_job_interrupted_mid_training_resumes_from_its_checkpoint(manifest, cohort, tmp_path):
    """Ctrl-C (SIGINT) after the first epoch: exit 3 with the trainer's checkpoint; --resume continues the
    job from it and ends with the logits of an uninterrupted run."""
    import signal

    from MedLoRALib.experiment.jobs import run_job

    out = tmp_path / "exp"
    argv = ["experiment", "--manifest", str(manifest), "--out", str(out), *FAST, "--arms", "lora_qv",
            "--epochs", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "MedLoRALib", *argv], env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "fold1-lora_qv: epoch 1/3" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 3, "".join(seen) + rest
    assert "stopped; its checkpoint is in" in rest and "--resume" in rest
    assert (out / "jobs" / "fold1-lora_qv" / "adapter.checkpoint" / "state.json").is_file()
    assert read_result(out / "jobs" / "fold1-lora_qv") is None
    code, err = _run([*argv, "--resume"])
    assert code == 0, err
    assert re.search(r"fold1-lora_qv: training on .*; resuming at step [1-9]", err)
    assert not (out / "jobs" / "fold1-lora_qv" / "adapter.checkpoint").exists()
    config = ExperimentConfig(manifest=manifest, out=tmp_path, folds=2, preset="tiny", pixels=32, epochs=3,
                              threads=1)
    with contextlib.redirect_stderr(io.StringIO()):
        expected = run_job(config, Job(1, "lora_qv"), make_folds(cohort, 2, 0)[0][0], cohort, tmp_path / "ref", "")
    assert read_result(out / "jobs" / "fold1-lora_qv")["validation"] == expected["validation"]


@pytest.mark.slow
def test_two_processes_give_the_same_report_as_one(experiment, manifest, tmp_path):
    """RANK 0 and 1 of WORLD_SIZE 2 (plain processes, as torchrun starts them) share the jobs."""
    source, _ = experiment
    out = tmp_path / "exp"
    argv = [sys.executable, "-m", "MedLoRALib", "experiment", "--manifest", str(manifest), "--out", str(out),
            *FAST, "--arms", "lora_qv,full"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    ranks = {read_result(out / "jobs" / f"fold{k}-{a}")["process"]["rank"] for k in (1, 2) for a in ("lora_qv", "full")}
    assert ranks == {0, 1}  # both processes trained
    assert "[rank 1]" in outputs[1][1] and "report:" in outputs[0][1] and "report:" not in outputs[1][1]
    mine, one = _arm_files(out), _arm_files(source)
    assert set(mine) == {"lora_qv", "full"}
    assert _without(mine) == _without({a: one[a] for a in mine})
    comparison = json.loads((out / "report" / "report.json").read_text())["comparisons"]
    assert _without(comparison) == _without(json.loads((source / "report" / "report.json").read_text())
                                            ["comparisons"][:1])


@pytest.mark.slow
def test_keep_adapters_writes_the_fold_model_the_result_came_from(cohort, tmp_path):
    """With --keep-adapters the job's adapter is the trainer's own output, and its validation
    predictions are the logits in result.json."""
    from MedLoRALib.experiment.jobs import run_job

    config = ExperimentConfig(manifest=cohort.manifest, out=tmp_path, folds=2, preset="tiny", pixels=32, epochs=1,
                              keep_adapters=True)
    split = make_folds(cohort, 2, 0)[0][1]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        record = run_job(config, Job(2, "lora_qv"), split, cohort, tmp_path / "fold2-lora_qv", "[x]")
    assert "[x] epoch 1/1" in err.getvalue()
    adapter = tmp_path / "fold2-lora_qv" / record["adapter"]
    metrics = json.loads((adapter / "metrics.json").read_text())
    assert [p["logit"] for p in metrics["validation_predictions"]] == pytest.approx(
        [v["logit"] for v in record["validation"]])
    assert [p["nodule_id"] for p in metrics["validation_predictions"]] == [v["nodule_id"] for v in record["validation"]]
    assert (adapter / "manifest.json").is_file() and not (tmp_path / "fold2-lora_qv" / "adapter.checkpoint").exists()
    assert read_result(tmp_path / "fold2-lora_qv") == json.loads(json.dumps(record))


# --- bad input -----------------------------------------------------------------------------------


def test_missing_manifest_is_named(tmp_path):
    code, err = _run(["experiment", "--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "e"), *FAST])
    assert code == 2 and "manifest not found" in err and "nope.csv" in err
    assert not (tmp_path / "e").exists()


def test_bad_options_are_refused():
    with pytest.raises(DatasetError, match="unknown arm"):
        ExperimentConfig(manifest="m.csv", out="e", arms=("lora_qv", "lora_qkv"))
    with pytest.raises(DatasetError, match="--folds must be at least 2"):
        ExperimentConfig(manifest="m.csv", out="e", folds=1)
    with pytest.raises(DatasetError, match="give one of them"):
        ExperimentConfig(manifest="m.csv", out="e", resume=True, overwrite=True)
    with pytest.raises(MedLoRAError, match="cannot be combined with several processes"):
        run_experiment(ExperimentConfig(manifest="m.csv", out="e", overwrite=True), procs=Processes(0, 2))


@pytest.mark.slow
def test_folds_the_cohort_cannot_fill_are_refused(cohort):
    # 5 patients; 4 have a malignant nodule, 4 a benign one
    with pytest.raises(DatasetError, match="5 patients for 6 folds.*--folds 5 or fewer"):
        make_folds(cohort, 6, 0)
    with pytest.raises(DatasetError, match=r"only 4 patient\(s\) have a malignant nodule.*one class only.*--folds 4"):
        make_folds(cohort, 5, 0)


@pytest.mark.slow
def test_foreign_and_mismatched_folders_are_left_alone(experiment, manifest, tmp_path):
    out, _ = experiment
    state = read_state(out)
    identity, folds = state["identity"], state["folds"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for flags in ({"resume": True, "overwrite": False}, {"resume": False, "overwrite": True}):
        with pytest.raises(OutputError, match="was not written by MedLoRA"):
            inspect_folder(foreign, identity, folds, inputs=[manifest], **flags)
    with pytest.raises(OutputError, match="an input of this run|holds"):
        inspect_folder(manifest.parent, identity, folds, inputs=[manifest], resume=False, overwrite=False)
    with pytest.raises(OutputError, match=r"other settings or data \(epochs: 1 then, 3 now\)"):
        inspect_folder(out, {**identity, "epochs": 3}, folds, inputs=[manifest], resume=True, overwrite=False)
    assert inspect_folder(out, identity, folds, inputs=[manifest], resume=True, overwrite=False).action == "resume"
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    (copy / "jobs" / "my-notes.txt").write_text("mine")
    before = tree_digest(copy)
    with pytest.raises(OutputError, match="did not write.*jobs/my-notes.txt"):
        inspect_folder(copy, identity, folds, inputs=[manifest], resume=False, overwrite=True)
    assert tree_digest(copy) == before


@pytest.mark.slow
def test_a_job_another_process_holds_is_not_trained_twice(experiment, cohort, tmp_path):
    out, _ = experiment
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    (copy / "jobs" / "fold1-full" / "result.json").unlink()
    config = ExperimentConfig(manifest=cohort.manifest, out=copy, folds=2, preset="tiny", pixels=32, epochs=1)
    runner = JobRunner(config, cohort, make_folds(cohort, 2, 0)[0], [Job(1, "full")], Processes(), lambda _: None)
    with OutputLock(copy / "jobs" / "fold1-full"):
        assert runner.try_run(Job(1, "full")) == "busy"
    assert read_result(copy / "jobs" / "fold1-full") is None and runner.trained == []
    assert runner.try_run(Job(1, "lora_qv")) == "done"


# --- DeLong's test -------------------------------------------------------------------------------


def test_delong_hand_computed_example():
    """Positives score (0.9, 0.6) and (0.8, 0.3), negatives (0.7, 0.2, 0.1) and (0.5, 0.4, 0.1).

    A: AUC 5/6; per positive V10 = (1, 2/3), per negative V01 = (1/2, 1, 1); S10 = 1/18, S01 = 1/12,
    var = S10/2 + S01/3 = 1/18. B: AUC 4/6; V10 = (1, 1/3), V01 = (1/2, 1/2, 1); S10 = 2/9, S01 = 1/12,
    var = 5/36. cov = (1/9)/2 + (1/24)/3 = 5/72. var(A − B) = 1/18 + 5/36 − 5/36 = 1/18, so
    z = (1/6)/√(1/18) = √2/2 and p = 2(1 − Φ(0.7071)) = 0.4795.
    """
    y = [1, 1, 0, 0, 0]
    result = delong_test(y, [0.9, 0.6, 0.7, 0.2, 0.1], [0.8, 0.3, 0.5, 0.4, 0.1])
    assert result.auc_a == pytest.approx(5 / 6) and result.auc_b == pytest.approx(4 / 6)
    assert np.allclose(result.covariance, [[1 / 18, 5 / 72], [5 / 72, 5 / 36]])
    assert result.se == pytest.approx(np.sqrt(1 / 18))
    assert result.z == pytest.approx(np.sqrt(2) / 2)
    assert result.p_value == pytest.approx(0.47950012, abs=1e-6)
    assert delong_test(y, [0.9, 0.6, 0.7, 0.2, 0.1], [0.9, 0.6, 0.7, 0.2, 0.1]).p_value == 1.0


def _pair_counting(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) by definition: ψ over every (positive, negative) pair, ties ½."""
    aucs, v10, v01 = [], [], []
    for s in scores:
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    return np.array(aucs), np.cov(np.array(v10)) / (y == 1).sum() + np.cov(np.array(v01)) / (y == 0).sum()


def test_delong_fast_algorithm_equals_pair_counting_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=(3, 60)) + y, 1)  # rounded: many ties
    aucs, cov = delong_covariance(y, scores)
    ref_aucs, ref_cov = _pair_counting(y, scores)
    assert np.allclose(aucs, ref_aucs) and np.allclose(cov, ref_cov)
    assert np.allclose(aucs, [roc_auc(y, s) for s in scores])


def test_delong_standard_error_agrees_with_the_paired_bootstrap():
    rng = np.random.default_rng(7)
    n = 400
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    a = 1.0 * y + shared + 0.6 * rng.normal(size=n)
    b = 0.7 * y + shared + 0.6 * rng.normal(size=n)
    result = delong_test(y, a, b)
    from scipy.stats import rankdata

    def auc(labels, scores):  # Mann–Whitney, as fast as a bootstrap needs
        positives = labels.sum()
        return (rankdata(scores)[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * (labels.size - positives))

    diffs, singles = [], []
    for _ in range(1000):
        idx = rng.integers(0, n, n)
        diffs.append(auc(y[idx], a[idx]) - auc(y[idx], b[idx]))
        singles.append(auc(y[idx], a[idx]))
    assert result.se == pytest.approx(np.std(diffs), rel=0.15)
    assert np.sqrt(result.covariance[0][0]) == pytest.approx(np.std(singles), rel=0.15)
    assert result.p_value < 0.05  # a clearly better score is found better
