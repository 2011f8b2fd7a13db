"""Several adapters, one answer: the mean probability, the spread between adapters, and disagreement.

Adapters trained at different sites or with different seeds are scored on the same
patches; their probabilities are combined here so that the engine, the CLI, the Slicer
table, the DICOM SR and the benchmarks report the same three numbers:

- ``probability``: the mean of the adapters' (temperature-scaled) probabilities;
- ``spread``: their standard deviation (population, ``ddof=0``) — the uncertainty;
- ``disagree``: True when the adapters' own labels (each at its own threshold) differ.

The ensemble's label applies the mean of the adapters' thresholds to the mean probability.
Only adapters that read the same patches of the same backbone can be combined
(``check_compatible``): anything else would average answers to different questions.
Torch-free: Slicer's process imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .adapters.manifest import AdapterManifest
from .errors import AdapterError


@dataclass(frozen=True)
class EnsembleScores:
    """Combined scores of N nodules by A adapters (arrays of length N)."""

    probability: np.ndarray
    spread: np.ndarray
    disagree: np.ndarray
    threshold: float

    def labels(self, label_names: Sequence[str]) -> list[str]:
        negative, positive = label_names
        return [positive if p >= self.threshold else negative for p in self.probability]


def combine(probabilities: np.ndarray, thresholds: Sequence[float]) -> EnsembleScores:
    """Combine an (adapters, nodules) array of probabilities, one threshold per adapter."""
    p = np.asarray(probabilities, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or t.shape != (p.shape[0],):
        raise ValueError(f"need (adapters, nodules) probabilities and one threshold per adapter, "
                         f"got {p.shape} and {t.shape}")
    positive = p >= t[:, None]
    return EnsembleScores(probability=p.mean(axis=0), spread=p.std(axis=0),
                          disagree=positive.any(axis=0) & ~positive.all(axis=0), threshold=float(t.mean()))


def check_compatible(manifests: dict[str, AdapterManifest]) -> None:
    """Refuse a set of adapters that do not read the same patches of the same backbone."""
    if len(manifests) < 2:
        raise AdapterError(f"an ensemble needs at least two adapters, got {len(manifests)}")
    (first_name, first), *others = manifests.items()

    def facts(m: AdapterManifest) -> dict:
        return {"backbone": m.backbone, "backbone weights (sha256)": m.backbone_sha256,
                "preprocessing (patch spec)": m.spec.to_dict(), "label names": list(m.label_names)}

    reference = facts(first)
    for name, manifest in others:
        for what, value in facts(manifest).items():
            if value != reference[what]:
                raise AdapterError(
                    f"adapters {first_name!r} and {name!r} cannot be combined: their {what} differ "
                    f"({reference[what]} vs {value}). An ensemble averages answers to the same question — "
                    f"choose adapters trained on the same backbone with the same patch spec.")
