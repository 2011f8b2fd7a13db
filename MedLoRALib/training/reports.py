"""Plots written next to an adapter: ROC, calibration and training curves (PNG, no torch).

Uses matplotlib's object API with the Agg canvas, never pyplot, so it neither needs a
display nor changes the backend of a process that imports it (Slicer's, for example).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from ..atomic import atomic_path
from .metrics import Metrics, sigmoid


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def plot_roc(path: Path, labels: np.ndarray, logits: np.ndarray, metrics: Metrics, title: str = "") -> Path:
    """ROC curve with its AUC, bootstrap interval and the operating point at the threshold."""
    fpr, tpr, _ = roc_curve(labels, logits)
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.add_subplot()
    lo, hi = metrics.auc_ci95
    ax.plot(fpr, tpr, lw=2, label=f"AUC {metrics.auc:.3f} (95% CI {lo:.3f}–{hi:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.plot(1 - metrics.specificity, metrics.sensitivity, "o", c="C3",
            label=f"threshold {metrics.threshold:.3f}: sens {metrics.sensitivity:.2f}, spec {metrics.specificity:.2f}")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=title or f"Validation ROC (n={metrics.n}, {metrics.n_positive} malignant)")
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, Path(path))


def plot_calibration(path: Path, labels: np.ndarray, logits: np.ndarray, temperature: float,
                     bins: int = 10) -> Path:
    """Reliability diagram before and after temperature scaling, with a histogram of probabilities."""
    labels = np.asarray(labels, dtype=float)
    fig = Figure(figsize=(4.6, 5.4))
    ax, hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    edges = np.linspace(0, 1, bins + 1)
    for name, probs, colour in (("uncalibrated", sigmoid(logits), "C0"),
                                (f"temperature {temperature:.2f}", sigmoid(np.asarray(logits) / temperature), "C1")):
        which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
        filled = [b for b in range(bins) if np.any(which == b)]
        mean_p = [probs[which == b].mean() for b in filled]
        frac = [labels[which == b].mean() for b in filled]
        ax.plot(mean_p, frac, "o-", c=colour, label=name)
        hist.hist(probs, bins=edges, histtype="step", color=colour)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(ylabel="fraction malignant", xlim=(0, 1), ylim=(0, 1), title="Calibration (validation)")
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel="predicted probability of malignancy", ylabel="nodules")
    return _save(fig, Path(path))


def plot_training_curves(path: Path, histories: dict[str, list[dict]]) -> Path:
    """Training loss and validation AUC per epoch, one line per fold (or the single run)."""
    fig = Figure(figsize=(8.0, 3.6))
    loss_ax, auc_ax = fig.subplots(1, 2)
    for n, (name, history) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in history]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, c=f"C{n}", label=name)
        aucs = [np.nan if h.get("val_auc") is None else h["val_auc"] for h in history]
        auc_ax.plot(epochs, aucs, "o-", ms=3, c=f"C{n}", label=name)
        best = [h["epoch"] for h in history if h.get("best")]
        if best:
            auc_ax.axvline(best[-1], c=f"C{n}", ls=":", lw=1)
    for ax in (loss_ax, auc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    auc_ax.set(xlabel="epoch", ylabel="validation ROC AUC", ylim=(0, 1.02), title="Validation AUC (dotted: best)")
    if len(histories) > 1:
        auc_ax.legend(fontsize=7)
    return _save(fig, Path(path))
