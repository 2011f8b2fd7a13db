"""The across-seed statistics of ``benchmarks/lora_vs_full.py --seeds`` (``benchmarks/_seed_stats.py``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _seed_stats import paired, spread, summarize  # noqa: E402


def test_spread_is_mean_sample_sd_and_range_and_leaves_out_nan():
    result = spread([0.7, 0.8, 0.9, math.nan])
    assert result["n"] == 3 and result["n_nan"] == 1
    assert result["mean"] == pytest.approx(0.8)
    assert result["sd"] == pytest.approx(0.1)  # ddof 1: sqrt((0.01 + 0 + 0.01) / 2)
    assert (result["min"], result["max"]) == (pytest.approx(0.7), pytest.approx(0.9))


def test_paired_difference_same_sign_in_every_seed_survives():
    a = [0.90, 0.85, 0.80, 0.88, 0.95]
    b = [0.80, 0.80, 0.70, 0.80, 0.80]  # a − b = 0.10, 0.05, 0.10, 0.08, 0.15
    result = paired(a, b)
    assert result["mean_diff"] == pytest.approx(0.096)
    half = 2.7764451 * 0.0364692 / math.sqrt(5)  # t(0.975, 4) · SD / √n
    assert result["ci95"] == pytest.approx([0.096 - half, 0.096 + half], abs=1e-5)
    assert result["same_sign"] == "5/5" and (result["wins"], result["losses"]) == (5, 0)
    assert result["survives"] is True
    # five seeds all agreeing is the smallest two-sided p either test can give
    assert result["wilcoxon_p"] == pytest.approx(0.0625)
    assert result["sign_test_p"] == pytest.approx(0.0625)
    assert result["min_p_possible"] == pytest.approx(0.0625)


def test_one_seed_against_the_others_means_the_difference_does_not_survive():
    a = [0.90, 0.85, 0.80, 0.88, 0.70]
    b = [0.80, 0.80, 0.70, 0.80, 0.80]  # a − b = 0.10, 0.05, 0.10, 0.08, −0.10
    result = paired(a, b)
    assert result["same_sign"] == "4/5" and result["losses"] == 1
    assert result["ci95"][0] < 0 < result["ci95"][1]
    assert result["survives"] is False
    assert result["wilcoxon_p"] > 0.0625


def test_interval_excluding_zero_without_every_seed_agreeing_does_not_survive():
    a = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.99, 1.0]
    b = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 0.5]
    result = paired(a, b)
    assert result["ci95"][0] > 0
    assert result["same_sign"] == "9/10"
    assert result["survives"] is False


def test_summarize_refuses_arms_measured_on_different_numbers_of_seeds():
    with pytest.raises(ValueError, match="one value per seed"):
        summarize({"full": [0.8, 0.7], "lora_qv": [0.8]}, [("lora_qv", "full")])
    with pytest.raises(ValueError, match="no values"):
        summarize({"full": [0.8, 0.7]}, [("lora_qv", "full")])


def test_summarize_names_pairs_a_minus_b():
    result = summarize({"full": [0.7, 0.8, 0.75], "lora_all": [0.8, 0.9, 0.8]}, [("lora_all", "full")])
    assert set(result["arms"]) == {"full", "lora_all"}
    assert result["pairs"]["lora_all - full"]["per_seed"] == pytest.approx([0.1, 0.1, 0.05])
