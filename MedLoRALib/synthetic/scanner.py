"""What the scanner adds: its point-spread function (and slice profile), correlated noise, 12-bit storage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

MIN_STORED_HU, MAX_STORED_HU = -1024, 3071  # the usual 12-bit CT range


def apply_scanner(hu: np.ndarray, spacing: tuple[float, float, float], noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Blur by the point-spread function (and slice profile), add correlated noise, store as int16."""
    sigma_kji = [max(0.6 / s, 0.42) for s in reversed(spacing)]
    if noise_hu > 0:
        white = rng.standard_normal(hu.shape, dtype=np.float32)
        hu += white * np.float32(noise_hu / _noise_gain(sigma_kji))
    blurred = ndimage.gaussian_filter(hu, sigma_kji, mode="nearest", truncate=3.0)
    return np.clip(np.rint(blurred), MIN_STORED_HU, MAX_STORED_HU).astype(np.int16)


def _noise_gain(sigmas: Sequence[float]) -> float:
    """How much a Gaussian filter shrinks the standard deviation of white noise."""
    gain = 1.0
    for sigma in sigmas:
        radius = int(3.0 * sigma + 0.5)
        weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        weights /= weights.sum()
        gain *= float(np.sqrt((weights ** 2).sum()))
    return gain
