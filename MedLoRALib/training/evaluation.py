"""Evaluation: validation logits, which epoch is best, and the metrics of a finished run.

A stage (the holdout run or one fold) ends with a ``StageResult`` holding its best epoch's
validation logits; ``pooled_evaluation`` turns them into the run's metrics, calibration and
per-nodule predictions (out-of-fold with K folds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import metrics as M
from .manifest import TrainingSet


@dataclass
class StageResult:
    """What a finished stage contributes to the run's evaluation (stored in the checkpoint as a dict)."""

    name: str
    best_epoch: int | None
    best_auc: float | None
    epochs_run: int
    val_indices: list[int] = field(default_factory=list)
    val_logits: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def improves(record: dict, best: dict | None) -> bool:
    """Higher validation AUC wins; equal AUC (often 1.0 on small sets) falls back to lower loss."""
    if best is None:
        return True
    if record["val_auc"] != best["auc"]:
        return bool(record["val_auc"] > best["auc"])
    return bool(record["val_loss"] < best["loss"])


@dataclass
class Evaluation:
    """The run's metrics, and the pooled validation labels and logits they come from."""

    overall: M.Metrics
    metrics: dict
    per_fold: list[dict]
    labels: np.ndarray
    logits: np.ndarray
    predictions: list[dict]


def pooled_evaluation(stages: list[dict], data: TrainingSet, *, kfold: bool, seed: int) -> Evaluation:
    """Metrics over every validated stage's best-epoch logits; each fold then at the pooled calibration."""
    folds = [f for f in stages if f["best_epoch"] is not None]
    indices = np.array([i for f in folds for i in f["val_indices"]], dtype=int)
    logits = np.array([v for f in folds for v in f["val_logits"]], dtype=float)
    all_labels = data.labels
    labels = all_labels[indices]
    overall = M.evaluate(labels, logits, seed=seed)
    per_fold = []
    for f in folds:
        fold_labels = all_labels[np.asarray(f["val_indices"], dtype=int)]
        fold_metrics = M.evaluate(fold_labels, np.asarray(f["val_logits"]), temperature=overall.temperature,
                                  threshold=overall.threshold, seed=seed)
        per_fold.append({"name": f["name"], "best_epoch": f["best_epoch"], "epochs_run": f["epochs_run"],
                         **fold_metrics.to_dict()})
    metrics = {"validation": "out-of-fold" if kfold else "holdout", **overall.to_dict()}
    if kfold:
        metrics["folds"] = per_fold
        metrics["fold_auc_mean"] = float(np.mean([f["auc"] for f in per_fold]))
        metrics["fold_auc_std"] = float(np.std([f["auc"] for f in per_fold]))
    samples = data.samples
    predictions = [{"nodule_id": samples[i].nodule_id, "patient_id": samples[i].patient_id, "row": samples[i].row,
                    "label": int(all_labels[i]), "logit": float(z),
                    "probability": float(M.sigmoid(z / overall.temperature))} for i, z in zip(indices, logits)]
    return Evaluation(overall=overall, metrics=metrics, per_fold=per_fold, labels=labels, logits=logits,
                      predictions=predictions)
