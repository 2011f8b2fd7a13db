"""The MedLoRA points CSV (docs/architecture.md): one nodule per row.

Columns: ``x, y, z`` (mm) and ``coordinate_system`` (``LPS`` or ``RAS``, per row — a
missing or unknown system is an error naming the row, never a guess); optional
``nodule_id, label (0/1 or benign/malignant), malignancy (1–5), diameter_mm,
patient_id, image``, and ``series_uid`` (the DICOM series the point was placed on).
``image`` (relative to the CSV's folder, or absolute) ties a row to a CT; given a CT, only
rows naming that CT, or naming none, are returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AnnotationError
from ..geometry import to_lps
from ..image import CTImage
from ..nodule import Nodule
from ._common import CsvRow, parse_float, parse_label, read_csv, show

REQUIRED = ("x", "y", "z", "coordinate_system")


def is_points_header(header: list[str]) -> bool:
    return all(c in header for c in ("x", "y", "z"))


def _resolve(value: str, folder: Path, where: str) -> Path:
    try:
        path = Path(value).expanduser()
        return (path if path.is_absolute() else folder / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # ~nobody, a symlink loop, a NUL character
        raise AnnotationError(f"{where}: image {show(value)} is not a usable path ({exc})") from None


def _row_nodule(row: CsvRow, path: Path, header: list[str]) -> Nodule:
    where = f"{path} line {row.line}"
    system = row.get("coordinate_system")
    if system.upper() not in ("LPS", "RAS"):
        raise AnnotationError(f"{where}: coordinate_system must be LPS or RAS, got {system or 'nothing'!r}; "
                              "Slicer shows RAS, DICOM/ITK tools use LPS — say which one the point is in")
    xyz = np.array([parse_float(row, c, path) for c in ("x", "y", "z")])
    try:
        label = parse_label(row.get("label"))
    except ValueError as exc:
        raise AnnotationError(f"{where}: {exc}") from None
    malignancy = parse_float(row, "malignancy", path, required=False) if "malignancy" in header else None
    if malignancy is not None and not 1 <= malignancy <= 5:
        raise AnnotationError(f"{where}: malignancy must be 1–5, got {malignancy:g}")
    diameter = parse_float(row, "diameter_mm", path, required=False) if "diameter_mm" in header else None
    if diameter is not None and diameter <= 0:
        raise AnnotationError(f"{where}: diameter_mm must be positive, got {diameter:g}")
    return Nodule(centre_lps=tuple(to_lps(xyz, system)),
                  nodule_id=row.get("nodule_id") or f"{path.stem}/row{row.line}",
                  case_id=row.get("patient_id"), series_uid=row.get("series_uid"),
                  diameter_mm=diameter, label=label, malignancy=malignancy,
                  source=f"points-csv:{path.name}:{row.line}")


def _row_is_for(row: CsvRow, image: CTImage, path: Path) -> bool:
    """Whether a row belongs to ``image``: its ``series_uid`` is the CT's series, or its ``image``
    is the CT's file or folder or a folder inside it (a series folder in a study folder, as TCIA
    lays them out). A row naming neither belongs to any CT."""
    series, named = row.get("series_uid"), row.get("image")
    if series and image.ids.series_uid:
        return series == image.ids.series_uid
    if not named or not image.source:
        return True
    target = _resolve(named, path.parent, f"{path} line {row.line}")
    source = Path(image.source).expanduser().resolve()
    return target == source or source in target.parents


def load_points_csv(path: str | Path, image: CTImage | None = None) -> list[Nodule]:
    """Rows of a points CSV as nodules in LPS mm (only ``image``'s rows when given).

    Returns an empty list when every row names another image or series than ``image``.
    """
    path = Path(path)
    header, rows = read_csv(path, "points", REQUIRED)
    if image is not None:
        rows = [r for r in rows if _row_is_for(r, image, path)]
    for row in rows:
        if "annotations" in header and row.get("annotations") and not row.get("x"):
            raise AnnotationError(f"{path} line {row.line} refers to an annotation file instead of a point; "
                                  "read such training manifests with `medlora dataset check`")
    return [_row_nodule(row, path, header) for row in rows]
