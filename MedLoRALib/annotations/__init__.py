"""Nodule annotations from any supported file → ``list[Nodule]`` in LPS millimetres.

Formats: LIDC-IDRI XML reads (``lidc``), LUNA16 CSVs (``luna16``), NLSTx boxes
(``nlstx``), Slicer markups JSON (``markups``) and the MedLoRA points CSV (``points``).
LIDC and NLSTx files are in pixel coordinates and need the CT they were drawn on.
Torch-free: numpy (and pydicom for DICOM slice identifiers) only.
"""

from __future__ import annotations

import csv
import inspect
from pathlib import Path

import numpy as np

from ..errors import AnnotationError
from ..geometry import ras_to_lps
from ..image import CTImage
from ..nodule import Nodule
from ._common import normalise_column, read_text
from .lidc import lidc_label, load_lidc_xml, median_malignancy
from .luna16 import is_luna16_header, load_luna16_csv
from .markups import load_markups, write_markups
from .nlstx import is_nlstx_header, load_nlstx_csv
from .points_csv import is_points_header, load_points_csv

__all__ = ["FORMATS", "detect_format", "lidc_label", "load_nodules", "median_malignancy",
           "validate_inside", "write_markups"]

_IMPORTERS = {"lidc": load_lidc_xml, "luna16": load_luna16_csv, "nlstx": load_nlstx_csv,
              "markups": load_markups, "points": load_points_csv}
FORMATS = tuple(_IMPORTERS)
_NEEDS_IMAGE = ("lidc", "nlstx")


def detect_format(path: str | Path) -> str:
    """Which importer reads ``path``, decided by its content (the extension only breaks ties)."""
    path = Path(path)
    text = read_text(path, "annotation")
    head = text.lstrip()
    if not head:
        raise AnnotationError(f"annotation file {path} is empty: no nodules to read")
    if head.startswith("<"):
        return "lidc"
    if head.startswith("{"):
        return "markups"
    first_line = head.splitlines()[0]
    try:
        header = [normalise_column(c) for c in next(csv.reader([first_line.replace(";", ",").replace("\t", ",")]))]
    except csv.Error as exc:  # e.g. a first "cell" beyond the csv module's field limit
        raise AnnotationError(f"cannot tell the format of {path}: its first line is not a CSV header ({exc}); "
                              "expected a LIDC XML, a Slicer .mrk.json or a CSV with a header line") from None
    for fmt, matches in (("nlstx", is_nlstx_header), ("luna16", is_luna16_header), ("points", is_points_header)):
        if matches(header):
            return fmt
    raise AnnotationError(
        f"cannot tell the format of {path}: its first line is {first_line[:120]!r}. Expected a "
        "LIDC XML, a Slicer .mrk.json, or a CSV with x,y,z,coordinate_system (points), "
        "seriesuid,coordX,coordY,coordZ (LUNA16) or NLSTx columns; or pass fmt=")


def load_nodules(path: str | Path, image: CTImage | None = None, fmt: str | None = None,
                 **options) -> list[Nodule]:
    """Read nodules from an annotation file, choosing the importer by content.

    Args:
        path: the annotation file.
        image: the CT the annotations belong to. Required for LIDC XML and NLSTx (pixel
            coordinates); for the others it selects that CT's rows (series UID, ``image``).
        fmt: force a format: one of ``FORMATS``.
        options: passed to the importer (e.g. ``min_readers`` for LIDC, ``series_uid``,
            ``slice_numbering`` for NLSTx).

    Returns the nodules in LPS mm; an empty list only when the file has nodules but none
    for ``image``. An empty, unreadable or malformed file raises AnnotationError.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise AnnotationError(f"unknown annotation format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt in _NEEDS_IMAGE and image is None:
        raise AnnotationError(f"{path} is a {fmt} file in pixel coordinates: it can only be read together "
                              "with the CT it was drawn on (pass the image / --volume)")
    importer = _IMPORTERS[fmt]
    accepted = [p for p in inspect.signature(importer).parameters if p not in ("path", "image")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise AnnotationError(f"option(s) {', '.join(unknown)} do not apply to {fmt} files "
                              f"(accepted: {', '.join(accepted) or 'none'})")
    if fmt == "markups":
        return importer(path, **options)
    return importer(path, image, **options)


# --- sanity checks against the CT ---------------------------------------------------
BODY_THRESHOLD_HU = -400.0  # below: air or lung; above: soft tissue, vessels, nodules


def _outside_body(image: CTImage, point_lps: np.ndarray) -> bool:
    """True when the point sits in air that reaches the edge of its slice: outside the
    patient (lung air is enclosed by the chest wall, so it never reaches the edge)."""
    from scipy import ndimage

    ijk = np.round(image.geometry.lps_to_ijk(point_lps)).astype(int)
    i, j, k = np.clip(ijk, 0, np.asarray(image.geometry.size) - 1)
    plane = image.voxels_hu[k]
    if plane[j, i] >= BODY_THRESHOLD_HU:
        return False
    labels, _ = ndimage.label(plane < BODY_THRESHOLD_HU)
    own = labels[j, i]
    edges = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return bool(np.any(edges == own))


def _describe(nodule: Nodule, index: int) -> str:
    x, y, z = nodule.centre_lps
    return f"#{index} {nodule.nodule_id or '(no id)'} at LPS ({x:.1f}, {y:.1f}, {z:.1f}) mm"


def validate_inside(nodules: list[Nodule], image: CTImage, check_body: bool = True) -> None:
    """Raise AnnotationError naming every nodule centre outside the CT volume and, with
    ``check_body``, every one in the air outside the patient.

    A point given in RAS but read as LPS lands mirrored in x and y; the message says
    where each bad point would land if it was RAS and whether that is inside the patient.
    Limitation: when the patient lies near the scanner's x = y = 0 (as in many chest CTs)
    the mirrored point is still inside the body — often in the other lung — and no
    geometric check can tell; only a coordinate system stated with the points can.
    """
    problems = []
    geometry = image.geometry
    for index, nodule in enumerate(nodules, start=1):
        centre = np.asarray(nodule.centre_lps, dtype=float)
        mirrored = ras_to_lps(centre)  # the point if its numbers were RAS
        if not geometry.contains_lps(centre)[0]:
            problem = f"{_describe(nodule, index)} is outside the CT volume"
        elif check_body and _outside_body(image, centre):
            problem = f"{_describe(nodule, index)} is in the air outside the patient's body"
        else:
            continue
        if geometry.contains_lps(mirrored)[0] and not _outside_body(image, mirrored):
            problem += (f" (read as RAS it would be at LPS ({mirrored[0]:.1f}, {mirrored[1]:.1f}, "
                        f"{mirrored[2]:.1f}) mm, inside the patient: RAS and LPS are probably swapped)")
        problems.append(problem)
    if problems:
        lo, hi = geometry.extent_lps
        raise AnnotationError(
            f"{len(problems)} of {len(nodules)} nodule point(s) cannot be on a nodule of this CT: "
            + "; ".join(problems)
            + f". The CT spans LPS x {lo[0]:.1f}…{hi[0]:.1f}, y {lo[1]:.1f}…{hi[1]:.1f}, "
              f"z {lo[2]:.1f}…{hi[2]:.1f} mm (RAS x {-hi[0]:.1f}…{-lo[0]:.1f}, y {-hi[1]:.1f}…{-lo[1]:.1f}). "
              "Check the coordinate system (Slicer shows RAS; a RAS point read as LPS is mirrored in x "
              "and y) and that the points belong to this series.")

