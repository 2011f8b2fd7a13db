"""One nodule record, whatever file it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Nodule:
    """A nodule located in world LPS millimetres.

    Args:
        centre_lps: nodule centre (x, y, z) in LPS mm.
        nodule_id: unique within its source (e.g. ``LIDC-IDRI-0001/n1``).
        case_id: patient or case identifier the nodule belongs to.
        series_uid: DICOM SeriesInstanceUID of the CT it was marked on, if known.
        diameter_mm: approximate diameter, if known.
        box_lps: optional (min corner, max corner) in LPS mm.
        label: 1 malignant, 0 benign, ``None`` unknown or excluded.
        malignancy: mean malignancy rating 1–5 over readers, if rated.
        ratings: every reader's malignancy rating.
        reader_count: how many readers marked it.
        source: which importer and file produced it (e.g. ``lidc-xml:069.xml``).
    """

    centre_lps: tuple[float, float, float]
    nodule_id: str = ""
    case_id: str = ""
    series_uid: str = ""
    diameter_mm: float | None = None
    box_lps: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    label: int | None = None
    malignancy: float | None = None
    ratings: tuple[int, ...] = field(default_factory=tuple)
    reader_count: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        self.centre_lps = tuple(float(v) for v in self.centre_lps)
        if len(self.centre_lps) != 3 or not np.isfinite(self.centre_lps).all():
            raise ValueError(f"nodule {self.nodule_id!r}: centre must be 3 finite numbers, got {self.centre_lps}")

    def to_dict(self) -> dict:
        return asdict(self)


def centres_lps(nodules: list[Nodule]) -> np.ndarray:
    """(N, 3) array of the nodules' LPS centres."""
    return np.array([n.centre_lps for n in nodules], dtype=float).reshape(-1, 3)
