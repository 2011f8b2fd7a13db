"""Validation metrics for a binary malignancy classifier (numpy + scikit-learn, no torch).

Probabilities are always ``sigmoid(logit / temperature)``; the threshold is applied to
that calibrated probability (``probability >= threshold`` means malignant), which is how
the scoring engine labels a nodule with the adapter's stored threshold and temperature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_auc_score, roc_curve

from ..errors import DatasetError


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return np.exp(-np.logaddexp(0.0, -x))


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise DatasetError("the model produced non-finite outputs (NaN or inf): lower the learning rate")
    return y, s


def both_classes(labels: np.ndarray) -> bool:
    return len(np.unique(np.asarray(labels).astype(int))) == 2


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (AUC is undefined, not 0.5)."""
    y, s = _check(labels, scores)
    return float(roc_auc_score(y, s)) if both_classes(y) else float("nan")


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC over nodules.

    Resamples that happen to hold one class only are drawn again (they have no AUC),
    so small validation sets still get an interval rather than NaN.
    """
    y, s = _check(labels, scores)
    if not both_classes(y):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n = y.size
    aucs = []
    attempts = 0
    while len(aucs) < n_boot and attempts < 20 * n_boot:
        attempts += 1
        idx = rng.integers(0, n, n)
        if both_classes(y[idx]):
            aucs.append(_fast_auc(y[idx], s[idx]))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(aucs, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _fast_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann–Whitney AUC with tied scores counted as half (equals sklearn's roc_auc_score)."""
    from scipy.stats import rankdata

    ranks = rankdata(s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Probability threshold maximising sensitivity + specificity − 1 (Youden's J).

    Among thresholds with equal J the highest is taken (fewest false positives). A
    threshold of exactly the chosen score counts that score as positive.
    """
    y, p = _check(labels, probabilities)
    if not both_classes(y):
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p)
    finite = np.isfinite(thresholds)
    j = (tpr - fpr)[finite]
    best = np.flatnonzero(j >= j.max() - 1e-12)  # equal J up to rounding
    return float(thresholds[finite][best].max())


def sensitivity_specificity(labels: np.ndarray, probabilities: np.ndarray,
                            threshold: float) -> tuple[float, float]:
    y, p = _check(labels, probabilities)
    predicted = p >= threshold
    positives, negatives = y == 1, y == 0
    sens = float(predicted[positives].mean()) if positives.any() else float("nan")
    spec = float((~predicted[negatives]).mean()) if negatives.any() else float("nan")
    return sens, spec


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    y, p = _check(labels, probabilities)
    return float(np.mean((p - y) ** 2))


def binary_nll(labels: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of sigmoid(logit / T), computed stably."""
    y, z = _check(labels, logits)
    z = z / temperature
    # -[y log σ(z) + (1-y) log(1-σ(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(labels: np.ndarray, logits: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """One-parameter temperature scaling: T minimising validation NLL of sigmoid(logit / T).

    Bounded Brent search over log T (the NLL is smooth and unimodal in log T for a
    fixed ranking). With one class only, or all logits zero, there is nothing to fit: 1.0.
    """
    y, z = _check(labels, logits)
    if not both_classes(y) or not np.any(z):
        return 1.0
    result = minimize_scalar(lambda log_t: binary_nll(y, z, float(np.exp(log_t))),
                             bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(result.x))


@dataclass
class Metrics:
    """What the adapter manifest and metrics.json record about validation."""

    n: int
    n_positive: int
    auc: float
    auc_ci95: tuple[float, float]
    threshold: float
    sensitivity: float
    specificity: float
    balanced_accuracy: float
    brier: float
    brier_uncalibrated: float
    nll: float
    nll_uncalibrated: float
    temperature: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["auc_ci95"] = list(self.auc_ci95)
        return d


def evaluate(labels: np.ndarray, logits: np.ndarray, *, temperature: float | None = None,
             threshold: float | None = None, n_boot: int = 1000, seed: int = 0) -> Metrics:
    """All validation metrics from raw logits.

    Args:
        temperature: fitted here on these logits when ``None``.
        threshold: Youden's threshold on the calibrated probabilities when ``None``.
    """
    y, z = _check(labels, logits)
    if temperature is None:
        temperature = fit_temperature(y, z)
    probs = sigmoid(z / temperature)
    if threshold is None:
        threshold = youden_threshold(y, probs)
    sens, spec = sensitivity_specificity(y, probs, threshold)
    return Metrics(
        n=int(y.size), n_positive=int(y.sum()), auc=roc_auc(y, z),
        auc_ci95=bootstrap_auc_ci(y, z, n_boot=n_boot, seed=seed), threshold=float(threshold),
        sensitivity=sens, specificity=spec, balanced_accuracy=float(np.mean([sens, spec])),
        brier=brier_score(y, probs), brier_uncalibrated=brier_score(y, sigmoid(z)),
        nll=binary_nll(y, z, temperature), nll_uncalibrated=binary_nll(y, z), temperature=float(temperature))


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: Σ_b (n_b / N) · |observed malignant rate_b − mean probability_b|.

    Equal-width probability bins [0, 1/bins), …, [1 − 1/bins, 1] (1.0 falls in the last);
    empty bins contribute nothing. 0 is perfect calibration; with few nodules per bin the
    estimate is noisy and biased upwards, so compare models on the same nodules only.
    """
    y, p = _check(labels, probabilities)
    if bins < 1:
        raise ValueError(f"bins must be ≥ 1, got {bins}")
    if p.size == 0:
        return float("nan")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probabilities must lie in [0, 1]")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() * abs(y[inside].mean() - p[inside].mean())
    return float(total / p.size)


# --- paired comparison of two ROC AUCs (DeLong) --------------------------------------------------


@dataclass
class DeLongResult:
    """DeLong's paired test of two correlated AUCs on the same nodules (two-sided).

    ``se`` is the standard error of ``difference`` (auc_a − auc_b); ``ci95`` its normal interval.
    ``p_value`` is 1.0 when both scores rank every pair alike (zero variance, zero difference).
    """

    n: int
    n_positive: int
    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    ci95: tuple[float, float]
    covariance: list[list[float]]  # 2×2 DeLong covariance of (auc_a, auc_b)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank (Sun & Xu's midrank, as scipy's ``rankdata``)."""
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance for ``scores`` of shape (k, n) on the same ``labels``.

    Sun & Xu's fast algorithm (IEEE SPL 21:1389, 2014): the structural components come from
    midranks within the positives, within the negatives and over both, in O(k n log n) instead of
    DeLong et al.'s (Biometrics 44:837, 1988) O(k m n) pair counts. Ties count as half.
    """
    y = np.asarray(labels).astype(int).ravel()
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.shape[1] != y.size:
        raise ValueError(f"{y.size} labels but scores of shape {s.shape}")
    if not both_classes(y):
        raise DatasetError("DeLong's test needs both benign and malignant nodules")
    positives, negatives = s[:, y == 1], s[:, y == 0]
    m, n = positives.shape[1], negatives.shape[1]
    aucs, v10, v01 = [], [], []
    for pos, neg in zip(positives, negatives):
        tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg]))
        aucs.append((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
        v10.append((tz[:m] - tx) / n)  # per positive: fraction of negatives it outranks
        v01.append(1.0 - (tz[m:] - ty) / m)  # per negative: fraction of positives that outrank it
    s10 = np.atleast_2d(np.cov(np.array(v10))) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(np.array(v01))) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return np.array(aucs), s10 / m + s01 / n


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """Is AUC(a) different from AUC(b)? Both score the same nodules (e.g. pooled out-of-fold predictions)."""
    from scipy.stats import norm

    y, a = _check(labels, scores_a)
    _, b = _check(labels, scores_b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.size} vs {b.size}")
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = float(np.sqrt(max(variance, 0.0)))
    if se > 1e-12:
        z = difference / se
        p = float(2.0 * norm.sf(abs(z)))
    else:
        z, p = (0.0, 1.0) if abs(difference) < 1e-12 else (float(np.sign(difference) * np.inf), 0.0)
    half = float(norm.ppf(0.975)) * se
    return DeLongResult(n=int(y.size), n_positive=int(y.sum()), auc_a=float(aucs[0]), auc_b=float(aucs[1]),
                        difference=difference, se=se, z=float(z), p_value=p,
                        ci95=(difference - half, difference + half), covariance=cov.tolist())
