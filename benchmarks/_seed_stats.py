"""Across-seed statistics for benchmarks that repeat one comparison on fresh cohorts.

One seed's AUCs on 40 validation nodules move by ±0.1 from sampling alone, so a claim such as
"arm A beats arm B" rests on the *paired* per-seed differences (same cohort, split and patches
for both arms): their mean, a t interval over seeds, how many seeds agree in sign, and a
Wilcoxon signed-rank / sign test. Imported as ``_seed_stats`` (a script's own folder is first
on ``sys.path``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _clean(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"expected one value per seed, got shape {array.shape}")
    return array


def spread(values: Sequence[float]) -> dict:
    """Mean, sample SD (ddof 1), min and max over seeds; NaN seeds are counted and left out."""
    array = _clean(values)
    kept = array[~np.isnan(array)]
    n = len(kept)
    return {"n": n, "n_nan": int(len(array) - n),
            "mean": float(kept.mean()) if n else math.nan,
            "sd": float(kept.std(ddof=1)) if n > 1 else math.nan,
            "min": float(kept.min()) if n else math.nan,
            "max": float(kept.max()) if n else math.nan}


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Paired differences a − b over seeds (both measured on the same seed's cohort and split).

    ``ci`` is the t interval of the mean difference over seeds; ``wins``/``losses``/``ties`` count
    seeds by the sign of the difference; ``sign_test_p`` (binomial, ties dropped) and
    ``wilcoxon_p`` (signed-rank, exact for small n) are two-sided. With 5 seeds neither test can go
    below 2/32 = 0.0625 even when all five agree, so ``min_p_possible`` is reported beside them.
    ``survives`` is the rule the docs use: the interval excludes 0 *and* every seed has the sign
    of the mean.
    """
    a, b = _clean(a), _clean(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one per seed on both sides, got {a.shape} and {b.shape}")
    d = a - b
    d = d[~np.isnan(d)]
    n = len(d)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    ties = n - wins - losses
    mean = float(d.mean()) if n else math.nan
    if n > 1:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        ci = [mean - half, mean + half]
    else:
        sd, ci = math.nan, [math.nan, math.nan]
    nonzero = wins + losses
    sign_p = float(stats.binomtest(wins, nonzero, 0.5).pvalue) if nonzero else math.nan
    if nonzero:
        wilcoxon_p = float(stats.wilcoxon(d[d != 0], alternative="two-sided").pvalue)
    else:
        wilcoxon_p = math.nan
    agree = max(wins, losses)
    survives = bool(n > 1 and (ci[0] > 0 or ci[1] < 0) and agree == n)
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "ci95": ci, "wins": wins, "losses": losses, "ties": ties,
            "same_sign": f"{agree}/{n}", "sign_test_p": sign_p, "wilcoxon_p": wilcoxon_p,
            "min_p_possible": 2 * 0.5 ** n if n else math.nan, "survives": survives,
            "per_seed": [float(x) for x in d]}


def summarize(per_seed: dict[str, Sequence[float]], pairs: Sequence[tuple[str, str]]) -> dict:
    """``{"arms": {arm: spread}, "pairs": {"a - b": paired}}`` for arms measured on the same seeds."""
    lengths = {len(v) for v in per_seed.values()}
    if len(lengths) > 1:
        raise ValueError(f"every arm needs one value per seed; got lengths {sorted(lengths)}")
    missing = sorted({name for pair in pairs for name in pair} - set(per_seed))
    if missing:
        raise ValueError(f"pairs name arms with no values: {missing}")
    return {"arms": {arm: spread(values) for arm, values in per_seed.items()},
            "pairs": {f"{a} - {b}": paired(per_seed[a], per_seed[b]) for a, b in pairs}}
