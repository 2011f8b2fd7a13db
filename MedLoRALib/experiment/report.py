"""The experiment's report from the finished jobs' ``result.json`` files (torch-free).

Per arm the out-of-fold logits of every fold (each nodule validated once, by the model whose
training never saw its patient) are pooled: ROC AUC with a percentile bootstrap interval over
nodules, the folds' AUCs, and the cost (trainable parameters, wall time, peak memory). Each
LoRA arm is compared with full fine-tuning by DeLong's paired test on the same pooled nodules.
``arm-<arm>.json`` holds each arm's numbers; ``report.md`` is formatted from exactly those
dicts, so the summary cannot disagree with the files. The folder is written as a whole
(``outputs.FolderOutput``): it appears complete or not at all.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import MedLoRAError
from ..outputs import FolderOutput
from ..training import metrics as M
from ..training.progress import jsonable
from .config import ARMS, ExperimentConfig
from .folder import JOBS, REPORT
from .jobs import Job, read_result

INDEX_NAME = "report.json"
COMPARED_WITH = "full"


def _listed(folder: Path) -> set[str] | None:
    try:
        return set(json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


REPORT_OUTPUT = FolderOutput(command="experiment", index_name=INDEX_NAME, listed=_listed, contents="report files")


def arm_file(arm: str) -> str:
    return f"arm-{arm}.json"


def collect(out: Path, jobs: list[Job]) -> dict[str, list[dict]]:
    """Every job's result, by arm in fold order; a missing one is an error (the report needs them all)."""
    results: dict[str, list[dict]] = {}
    for job in jobs:
        record = read_result(out / JOBS / job.name)
        if record is None:
            raise MedLoRAError(f"{out / JOBS / job.name} has no result.json: the job is not finished; rerun with "
                               "--resume to train it")
        results.setdefault(job.arm, []).append(record)
    return results


def pooled(results: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample indices, labels, logits) of one arm's folds, in sample order."""
    rows = sorted((v["index"], v["label"], v["logit"]) for r in results for v in r["validation"])
    index, labels, logits = (np.array(c) for c in zip(*rows))
    if len(set(index.tolist())) != len(index):
        raise MedLoRAError("a nodule was validated in two folds: the jobs' results come from different folds")
    return index.astype(int), labels.astype(int), logits.astype(float)


def _memory(results: list[dict], key: str) -> float | None:
    values = [r["memory"].get(key) for r in results if r.get("memory", {}).get(key) is not None]
    return max(values) if values else None


def fold_metrics(validation: list[dict], *, n_boot: int, seed: int) -> dict:
    """One fold × arm's metrics from its validation nodules (stored in its ``result.json``)."""
    y = [v["label"] for v in validation]
    z = [v["logit"] for v in validation]
    return jsonable({"n": len(y), "n_positive": int(sum(y)), "auc": M.roc_auc(y, z),
                     "auc_ci95": list(M.bootstrap_auc_ci(y, z, n_boot=n_boot, seed=seed)), "n_boot": n_boot})


def arm_summary(arm: str, results: list[dict], *, n_boot: int, seed: int) -> dict:
    """One arm's numbers: pooled out-of-fold AUC with its interval, each fold's metrics file, and the cost."""
    _, labels, logits = pooled(results)
    folds = []
    for r in results:
        m = r["metrics"]
        folds.append({"fold": r["fold"], "n": m["n"], "n_positive": m["n_positive"], "auc": m["auc"],
                      "auc_ci95": m["auc_ci95"], "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "wall_s": r["wall_s"],
                      "train_loop_s": r["train_loop_s"], "resumed": r["resumed"],
                      "peak_memory_mib": r["memory"].get("peak_mib"),
                      "memory_increase_mib": r["memory"].get("increase_mib")})
    fold_aucs = [f["auc"] for f in folds]
    trainable, total = results[0]["trainable_parameters"], results[0]["total_parameters"]
    return jsonable({
        "arm": arm, "mode": ARMS[arm][0], "lora_targets": ARMS[arm][1], "n": int(labels.size),
        "n_positive": int(labels.sum()), "auc": M.roc_auc(labels, logits),
        "auc_ci95": list(M.bootstrap_auc_ci(labels, logits, n_boot=n_boot, seed=seed)), "n_boot": n_boot,
        "fold_auc_mean": float(np.nanmean(fold_aucs)), "fold_auc_sd": float(np.nanstd(fold_aucs)),
        "brier": M.brier_score(labels, M.sigmoid(logits)),
        "trainable_parameters": int(trainable), "total_parameters": int(total),
        "trainable_percent": 100.0 * trainable / total,
        "wall_s_total": float(sum(r["wall_s"] for r in results)),
        "train_loop_s_total": float(sum(r["train_loop_s"] for r in results)),
        "wall_s_per_fold": float(np.mean([r["wall_s"] for r in results])),
        "peak_memory_mib": _memory(results, "peak_mib"), "memory_increase_mib": _memory(results, "increase_mib"),
        "memory_kind": results[0]["memory"].get("kind"), "device": results[0].get("device"),
        "folds": folds})


def comparisons(results: dict[str, list[dict]]) -> list[dict]:
    """DeLong's paired test of every LoRA arm against full fine-tuning on the same pooled nodules."""
    if COMPARED_WITH not in results:
        return []
    base_index, labels, base = pooled(results[COMPARED_WITH])
    out = []
    for arm in (a for a in results if ARMS[a][0] == "lora"):
        index, arm_labels, logits = pooled(results[arm])
        if not (np.array_equal(index, base_index) and np.array_equal(arm_labels, labels)):
            raise MedLoRAError(f"{arm} and {COMPARED_WITH} were validated on different nodules; cannot pair them")
        test = M.delong_test(labels, logits, base)
        out.append({"a": arm, "b": COMPARED_WITH, "test": "DeLong (paired, two-sided)", **test.to_dict()})
    return jsonable(out)


# --- plots ---------------------------------------------------------------------------------------


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_roc(path: Path, results: dict[str, list[dict]], summaries: dict[str, dict]) -> None:
    from sklearn.metrics import roc_curve

    fig = _figure((4.8, 4.6))
    ax = fig.add_subplot()
    for n, (arm, rs) in enumerate(results.items()):
        _, labels, logits = pooled(rs)
        fpr, tpr, _ = roc_curve(labels, logits)
        s = summaries[arm]
        ax.plot(fpr, tpr, lw=2, c=f"C{n}", label=f"{arm}: AUC {_num(s['auc'])} ({_ci(s['auc_ci95'])})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title="Out-of-fold ROC, pooled over folds")
    ax.legend(loc="lower right", fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")


def plot_calibration(path: Path, results: dict[str, list[dict]], bins: int = 10) -> None:
    """Reliability diagram of sigmoid(logit) per arm (no temperature: what each arm's model outputs)."""
    fig = _figure((4.8, 5.6))
    ax, hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    edges = np.linspace(0, 1, bins + 1)
    for n, (arm, rs) in enumerate(results.items()):
        _, labels, logits = pooled(rs)
        probs = M.sigmoid(logits)
        which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
        filled = [b for b in range(bins) if np.any(which == b)]
        ax.plot([probs[which == b].mean() for b in filled], [labels[which == b].mean() for b in filled], "o-",
                c=f"C{n}", ms=3, label=arm)
        hist.hist(probs, bins=edges, histtype="step", color=f"C{n}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(ylabel="fraction malignant", xlim=(0, 1), ylim=(0, 1), title="Calibration, out-of-fold")
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel="predicted probability of malignancy (sigmoid of the logit)", ylabel="nodules")
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")


# --- text ----------------------------------------------------------------------------------------


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(ci) -> str:
    return "95% CI n/a" if ci is None or None in ci else f"95% CI {ci[0]:.3f}–{ci[1]:.3f}"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


def markdown(state: dict, config: ExperimentConfig, summaries: dict[str, dict], tests: list[dict]) -> str:
    """The summary, every number formatted from ``summaries`` (= the arm files) and ``tests``."""
    ident, cohort = state["identity"], state["cohort"]
    preset = config.preset_values
    lines = [
        f"# LoRA vs full fine-tuning vs linear probe on {Path(ident['manifest']).name}", "",
        f"- Cohort: {cohort['nodules']} nodules ({cohort['benign']} benign, {cohort['malignant']} malignant) of "
        f"{cohort['patients']} patients ({cohort['excluded']} manifest rows marked excluded).",
        f"- Validation: {ident['folds']}-fold cross-validation by patient (stratified, seed {ident['seed']}); every "
        "arm uses the same folds, so each nodule is validated once per arm by a model that never saw its patient.",
        f"- Backbone: {ident['backbone']} ({config.preset}: {preset.description})"
        + ("; **randomly initialised** (seeded), not pre-trained" if ident["random_init"] else "") + ".",
        f"- Budget per fold and arm: at most {ident['epochs']} epoch(s) (best validation epoch kept, patience "
        f"{ident['patience']}), batch {ident['batch_size']}, {ident['views']} patches of {ident['pixels']} px over "
        "50 mm, each mode at the trainer's default learning rate.", "",
        "## Out-of-fold ROC AUC and cost per arm", "",
        "| arm | AUC (95% CI) | fold AUC mean ± SD | trainable parameters | training time | wall time | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in summaries.items():
        lines.append(f"| {arm} | {_num(s['auc'])} ({_ci(s['auc_ci95'])}) | {_num(s['fold_auc_mean'])} ± "
                     f"{_num(s['fold_auc_sd'])} | {s['trainable_parameters']:,} ({s['trainable_percent']:.2f}%) | "
                     f"{s['train_loop_s_total']:.1f} s | {s['wall_s_total']:.1f} s | {_mib(s['peak_memory_mib'])} |")
    any_arm = next(iter(summaries.values()))
    lines += ["", f"AUC over the pooled out-of-fold logits (each fold's best epoch; logits of different folds' "
              f"models pooled), percentile bootstrap over nodules ({any_arm['n_boot']} resamples). Times are sums over folds on "
              f"{any_arm['device']}: training time = the epochs (optimizer steps and validation), wall time = the "
              "whole job (also model set-up and evaluation). Peak memory: the largest fold's "
              f"{any_arm['memory_kind']} (the increase over each job's start is in the arm files)"
              + (". On the CPU one process runs many jobs and keeps memory an earlier job freed, so a later job's "
                 "figures can understate its need: for clean CPU figures run one arm per process (--arms)."
                 if any_arm["memory_kind"] == "process peak RSS" else ".")]
    lines += ["", "## LoRA vs full fine-tuning (DeLong, paired, pooled out-of-fold)", ""]
    if tests:
        lines += ["| comparison | AUC difference (95% CI) | z | p |", "|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['a']} − {t['b']} | {t['difference']:+.3f} ({_ci(t['ci95'])}) | {_num(t['z'], 2)} | "
                         f"{_num(t['p_value'])} |")
        lines += ["", "Two-sided; p < 0.05 says the AUCs differ on this cohort, p ≥ 0.05 only that this cohort "
                  "cannot tell them apart (not that they are equal). No correction for the number of comparisons."]
    else:
        lines.append(f"Not computed: the {COMPARED_WITH!r} arm was not run (--arms).")
    lines += ["", "## AUC per fold", "", "| fold | patients | " + " | ".join(summaries) + " |",
              "|---|---|" + "---|" * len(summaries)]
    for k, patients in enumerate(state["folds"].values()):
        cells = [_num(s["folds"][k]["auc"]) for s in summaries.values()]
        lines.append(f"| {k + 1} | {len(patients)} | " + " | ".join(cells) + " |")
    lines += ["", "Files: `roc.png`, `calibration.png`, " + ", ".join(f"`{arm_file(a)}`" for a in summaries)
              + ", `folds.csv` (fold × arm), `predictions.csv` (out-of-fold logits), `report.json`.", ""]
    return "\n".join(lines)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_report(config: ExperimentConfig, data, members: dict, jobs: list[Job]) -> Path:
    """Write ``<out>/report`` from the jobs' results; returns its path."""
    from ..atomic import write_json_atomic
    from .folder import read_state

    state = read_state(config.out)
    results = collect(config.out, jobs)
    summaries = {arm: arm_summary(arm, rs, n_boot=config.n_boot, seed=config.seed) for arm, rs in results.items()}
    tests = comparisons(results)
    target = config.out / REPORT
    with REPORT_OUTPUT.writing(target, overwrite=True) as staging:
        files = []
        for arm, s in summaries.items():
            write_json_atomic(staging / arm_file(arm), s)
            files.append(arm_file(arm))
        _write_csv(staging / "folds.csv", ["fold", "arm", "n", "n_positive", "auc", "auc_ci_low", "auc_ci_high",
                                           "best_epoch", "epochs_run", "train_loop_s", "wall_s", "peak_memory_mib"],
                   [[f["fold"], arm, f["n"], f["n_positive"], f["auc"], *f["auc_ci95"], f["best_epoch"],
                     f["epochs_run"], f["train_loop_s"], f["wall_s"], f["peak_memory_mib"]] for arm, s in summaries.items()
                    for f in s["folds"]])
        index = pooled(next(iter(results.values())))[0]
        fold_of = {v["index"]: r["fold"] for r in next(iter(results.values())) for v in r["validation"]}
        logits = {arm: dict(zip(*pooled(rs)[::2])) for arm, rs in results.items()}
        samples = data.samples
        _write_csv(staging / "predictions.csv", ["index", "nodule_id", "patient_id", "row", "fold", "label",
                                                 *(f"logit_{a}" for a in results)],
                   [[i, samples[i].nodule_id, samples[i].patient_id, samples[i].row, fold_of[i], samples[i].label,
                     *(logits[a][i] for a in results)] for i in index.tolist()])
        plot_roc(staging / "roc.png", results, summaries)
        plot_calibration(staging / "calibration.png", results)
        (staging / "report.md").write_text(markdown(state, config, summaries, tests), encoding="utf-8")
        files += ["folds.csv", "predictions.csv", "roc.png", "calibration.png", "report.md"]
        write_json_atomic(staging / INDEX_NAME, jsonable({
            "format": "medlora-experiment-report", "files": files, "identity": state["identity"],
            "cohort": state["cohort"], "folds": members, "arms": summaries, "comparisons": tests}))
    return target
