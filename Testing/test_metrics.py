"""Validation metrics against scikit-learn and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, log_loss, roc_auc_score

from MedLoRALib.training import metrics as m


@pytest.fixture()
def scored():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    logits = labels * 1.5 + rng.normal(0, 1.2, 200)
    return labels, logits


def test_auc_matches_sklearn_including_ties(scored):
    labels, logits = scored
    assert m.roc_auc(labels, logits) == pytest.approx(roc_auc_score(labels, logits))
    tied = np.round(logits)  # many ties
    assert m._fast_auc(labels, tied) == pytest.approx(roc_auc_score(labels, tied))


def test_auc_hand_cases():
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert m.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert m.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one pair out of four is misordered
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9]) == 0.75
    assert np.isnan(m.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_bootstrap_interval_brackets_auc_and_is_reproducible(scored):
    labels, logits = scored
    auc = m.roc_auc(labels, logits)
    lo, hi = m.bootstrap_auc_ci(labels, logits, n_boot=500, seed=1)
    assert lo < auc < hi
    assert 0.05 < hi - lo < 0.3
    assert (lo, hi) == m.bootstrap_auc_ci(labels, logits, n_boot=500, seed=1)
    # more data → narrower interval
    big_lo, big_hi = m.bootstrap_auc_ci(np.tile(labels, 4), np.tile(logits, 4), n_boot=500, seed=1)
    assert big_hi - big_lo < hi - lo


def test_bootstrap_survives_tiny_sets():
    lo, hi = m.bootstrap_auc_ci([0, 1, 0, 1, 1], [0.1, 0.9, 0.3, 0.2, 0.8], n_boot=200)
    assert 0.0 <= lo <= hi <= 1.0


def test_youden_threshold_hand_case():
    labels = [0, 0, 0, 1, 1, 1]
    probs = [0.1, 0.2, 0.45, 0.4, 0.7, 0.9]
    # J at 0.7: sens 2/3, spec 1 → 0.667; at 0.4: sens 1, spec 2/3 → 0.667; at 0.45: 2/3, 2/3;
    # ties go to the highest threshold.
    assert m.youden_threshold(labels, probs) == 0.7
    assert m.youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8]) == 0.6


def test_sensitivity_specificity_and_balanced_accuracy_match_sklearn(scored):
    labels, logits = scored
    probs = m.sigmoid(logits)
    thr = m.youden_threshold(labels, probs)
    sens, spec = m.sensitivity_specificity(labels, probs, thr)
    predicted = (probs >= thr).astype(int)
    assert sens == pytest.approx(np.mean(predicted[labels == 1] == 1))
    assert spec == pytest.approx(np.mean(predicted[labels == 0] == 0))
    ev = m.evaluate(labels, logits, temperature=1.0, n_boot=50)
    assert ev.balanced_accuracy == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert ev.brier == pytest.approx(brier_score_loss(labels, probs))
    assert ev.nll == pytest.approx(log_loss(labels, probs))


def test_temperature_scaling_recovers_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, 4000)
    labels = (rng.random(4000) < m.sigmoid(true_logits)).astype(int)
    overconfident = true_logits * 3.0  # a model 3× too sure of itself
    t = m.fit_temperature(labels, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    assert m.binary_nll(labels, overconfident, t) < m.binary_nll(labels, overconfident)
    # calibration never changes the ranking
    ev = m.evaluate(labels, overconfident, n_boot=20)
    assert ev.temperature == pytest.approx(t)
    assert ev.auc == pytest.approx(roc_auc_score(labels, true_logits))
    assert ev.brier < ev.brier_uncalibrated


def test_degenerate_inputs():
    assert m.fit_temperature([1, 1, 1], [1.0, 2.0, 3.0]) == 1.0
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        m.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(m.DatasetError, match="non-finite"):
        m.evaluate([0, 1], [np.nan, 1.0])


def test_sigmoid_is_stable_for_extreme_logits():
    out = m.sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    assert np.all(np.isfinite(out))
    assert out.tolist() == [0.0, 0.5, 1.0]


def test_expected_calibration_error_hand_cases():
    # two bins used: [0.2, 0.3) holds 0.2, 0.2 with one positive (rate 0.5, mean 0.2: gap 0.3);
    # [0.9, 1.0] holds 0.9 and 1.0 with two positives (rate 1, mean 0.95: gap 0.05) → (2·0.3 + 2·0.05) / 4
    assert m.expected_calibration_error([0, 1, 1, 1], [0.2, 0.2, 0.9, 1.0]) == pytest.approx(0.175)
    assert m.expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    assert m.expected_calibration_error([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.0)
    assert m.expected_calibration_error([1, 1, 0, 0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        m.expected_calibration_error([0, 1], [0.5, 1.5])


def test_expected_calibration_error_finds_miscalibration():
    rng = np.random.default_rng(7)
    p = rng.uniform(0, 1, 20000)
    labels = (rng.uniform(0, 1, p.size) < p).astype(int)  # calibrated by construction
    assert m.expected_calibration_error(labels, p) < 0.02
    overconfident = np.clip(0.5 + 2 * (p - 0.5), 0, 1)
    assert m.expected_calibration_error(labels, overconfident) > 0.1  # about 0.13
