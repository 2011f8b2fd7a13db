"""LUNA16 CSVs: ``annotations.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm) and
``candidates.csv`` / ``candidates_V2.csv`` (seriesuid, coordX, coordY, coordZ, class).

LUNA16 coordinates are ITK world coordinates of the ``.mhd`` images, i.e. LPS mm, so
they are used unchanged. In candidates files ``class`` means "is a nodule" (1) or "is not"
(0) — the detection task, not malignancy — so class-0 rows are skipped and no row gets a
malignancy label (``Nodule.label`` stays ``None``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AnnotationError
from ..image import CTImage
from ..nodule import Nodule
from ._common import parse_float, parse_label, read_csv

REQUIRED = ("seriesuid", "coordx", "coordy", "coordz")
_UID_CHARS = set("0123456789.")


def image_series_uid(image: CTImage | None) -> str | None:
    """The CT's SeriesInstanceUID, or the name of its file when that is a UID (LUNA16's
    ``<seriesuid>.mhd`` files carry no DICOM identifiers)."""
    if image is None:
        return None
    if image.ids.series_uid:
        return image.ids.series_uid
    name = Path(image.source).name if image.source else ""
    for suffix in (".nii.gz", ".mhd", ".mha", ".nrrd", ".nhdr", ".nii"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return name if name.count(".") >= 2 and set(name) <= _UID_CHARS else None


def is_luna16_header(header: list[str]) -> bool:
    return all(c in header for c in REQUIRED)


def load_luna16_csv(path: str | Path, image: CTImage | None = None, *,
                    series_uid: str | None = None) -> list[Nodule]:
    """Rows of a LUNA16 CSV as nodules, optionally only those of one series.

    Args:
        path: ``annotations.csv`` or a candidates file.
        image: when given (and ``series_uid`` is not), keep the rows of its series.
        series_uid: keep only rows of this SeriesInstanceUID.

    Returns an empty list when the file has rows but none for the series asked for.
    """
    path = Path(path)
    header, rows = read_csv(path, "LUNA16", REQUIRED)
    wanted = series_uid or image_series_uid(image)
    if image is not None and wanted is None and len({r.get("seriesuid") for r in rows}) > 1:
        raise AnnotationError(f"{path} holds several series and this CT has no SeriesInstanceUID "
                              "(nor a file named by one, as LUNA16's .mhd files are); pass series_uid")
    kind = "luna16-candidates" if "class" in header else "luna16"
    nodules = []
    per_series: dict[str, int] = {}
    for row in rows:
        uid = row.get("seriesuid")
        if not uid:
            raise AnnotationError(f"{path} line {row.line}: seriesuid is empty")
        if wanted is not None and uid != wanted:
            continue
        try:
            if "class" in header and parse_label(row.get("class")) == 0:
                continue  # a detection candidate that is not a nodule
        except ValueError as exc:
            raise AnnotationError(f"{path} line {row.line}: class: {exc}") from None
        per_series[uid] = per_series.get(uid, 0) + 1
        nodules.append(Nodule(
            centre_lps=tuple(parse_float(row, c, path) for c in ("coordx", "coordy", "coordz")),
            nodule_id=f"{uid}/n{per_series[uid]}", case_id=uid, series_uid=uid,
            diameter_mm=parse_float(row, "diameter_mm", path, required=False) if "diameter_mm" in header else None,
            source=f"{kind}:{path.name}:{row.line}"))
    return nodules
