"""NLSTx boxes (Veasey et al. 2020/2025): one axial bounding box per nodule, in pixels,
on the slice where the nodule is widest → Nodule in LPS mm with ``box_lps``.

Columns: ``fold, PID, study_yr, malignancy (B/M), seriesinstanceuids, Abnormality UID,
Slice number, Bounding box x/y/width/height (pixels)``.

Conventions (the dataset's README does not define them, so they are parameters):

* ``Slice number`` is 1-based (the file's smallest value is 3, never 0) and, by default,
  counts slices from the most superior one (``slice_numbering="superior_first"``): NLST
  scans run head to feet and scanners number the images in acquisition order, which is
  what a reading workstation shows as the image number. ``"inferior_first"`` counts
  from the feet; ``"instance_number"`` matches the DICOM InstanceNumber of the slices
  (needs the CT loaded from its DICOM folder).
* Box x is the column and y the row of the top-left pixel (0-based), width and height
  count pixels, so the box covers columns x … x+width−1; its centre is at column
  x + (width−1)/2 — the same point as the centre of a continuous [x, x+width) box in
  pixel-corner coordinates.
* The diameter estimate is the box's longer side in mm (a lower bound of the longest
  axial diameter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import AnnotationError
from ..geometry import Geometry
from ..image import CTImage
from ..nodule import Nodule
from ._common import CsvRow, dicom_positions_by, parse_float, parse_label, read_csv
from .luna16 import image_series_uid

SliceNumbering = Literal["superior_first", "inferior_first", "instance_number"]

COLUMNS = {
    "pid": "pid", "study_yr": "study_yr", "malignancy": "malignancy", "series": "seriesinstanceuids",
    "abnormality": "abnormality uid", "slice": "slice number", "x": "bounding box x (pixels)",
    "y": "bounding box y (pixels)", "width": "bounding box width (pixels)",
    "height": "bounding box height (pixels)",
}


def is_nlstx_header(header: list[str]) -> bool:
    return COLUMNS["series"] in header and COLUMNS["slice"] in header


def dicom_instance_positions(folder: Path) -> dict[int, np.ndarray]:
    """InstanceNumber → ImagePositionPatient (LPS mm) of every DICOM image under ``folder``."""
    return {int(float(k)): v for k, v in dicom_positions_by(folder, "InstanceNumber").items()}


def slice_index(number: int, geometry: Geometry, numbering: SliceNumbering, first_slice_number: int,
                instance_positions: dict[int, np.ndarray] | None = None) -> int | None:
    """Volume slice index k of a slice number, or None when it is out of range."""
    if numbering == "instance_number":
        position = (instance_positions or {}).get(number)
        if position is None:
            return None
        return int(round(float(geometry.lps_to_ijk(position)[2])))
    slice_z = geometry.ijk_to_lps(np.column_stack([np.zeros((geometry.size[2], 2)),
                                                   np.arange(geometry.size[2])]))[:, 2]
    order = np.argsort(-slice_z if numbering == "superior_first" else slice_z, kind="stable")
    position = number - first_slice_number
    return int(order[position]) if 0 <= position < len(order) else None


def _box_nodule(row: CsvRow, path: Path, geometry: Geometry, k: int) -> tuple[np.ndarray, tuple, float]:
    x, y, w, h = (parse_float(row, COLUMNS[c], path) for c in ("x", "y", "width", "height"))
    if w < 1 or h < 1:
        raise AnnotationError(f"{path} line {row.line}: box width and height must be ≥ 1 pixel, got {w:g}×{h:g}")
    cols, rows = geometry.size[0], geometry.size[1]
    if x < 0 or y < 0 or x + w > cols or y + h > rows:
        raise AnnotationError(f"{path} line {row.line}: box x {x:g}, y {y:g}, {w:g}×{h:g} px does not fit "
                              f"in the CT's {cols}×{rows} slices; is this the right series?")
    centre_lps = geometry.ijk_to_lps((x + (w - 1) / 2, y + (h - 1) / 2, k))
    corners = np.array([[i, j, kk] for i in (x - 0.5, x + w - 0.5) for j in (y - 0.5, y + h - 0.5)
                        for kk in (k - 0.5, k + 0.5)])
    world = geometry.ijk_to_lps(corners)
    box_lps = (tuple(world.min(axis=0)), tuple(world.max(axis=0)))
    diameter = max(w * geometry.spacing[0], h * geometry.spacing[1])
    return centre_lps, box_lps, diameter


def load_nlstx_csv(path: str | Path, image: CTImage, *, series_uid: str | None = None,
                   slice_numbering: SliceNumbering = "superior_first", first_slice_number: int = 1,
                   instance_positions_lps: dict[int, np.ndarray] | None = None) -> list[Nodule]:
    """Boxes of one series placed in ``image`` (LPS mm).

    Args:
        path: the NLSTx CSV.
        image: the CT the boxes were drawn on.
        series_uid: which series' rows to use; by default the CT's own SeriesInstanceUID,
            or the file's only series.
        slice_numbering: how ``Slice number`` counts slices (see the module docstring).
        first_slice_number: the number of the first slice (1 in NLSTx).
        instance_positions_lps: InstanceNumber → ImagePositionPatient, for
            ``"instance_number"``; read from the CT's DICOM folder when not given.

    Returns an empty list when the file has rows but none for this series.
    """
    path = Path(path)
    if image is None:
        raise AnnotationError(f"{path}: NLSTx boxes are in pixel and slice numbers; pass the CT "
                              "series they were drawn on (image=...) to place them")
    if slice_numbering not in ("superior_first", "inferior_first", "instance_number"):
        raise AnnotationError(f"unknown slice_numbering {slice_numbering!r}: use superior_first, "
                              "inferior_first or instance_number")
    _, rows = read_csv(path, "NLSTx", tuple(COLUMNS.values()))
    wanted = series_uid or image_series_uid(image)
    series_in_file = {r.get(COLUMNS["series"]) for r in rows}
    if wanted is None:
        if len(series_in_file) > 1:
            raise AnnotationError(f"{path} holds {len(series_in_file)} series and this CT has no "
                                  "SeriesInstanceUID; pass series_uid to choose one")
        wanted = next(iter(series_in_file))
    if slice_numbering == "instance_number" and instance_positions_lps is None:
        if not (image.source and Path(image.source).is_dir()):
            raise AnnotationError("slice_numbering='instance_number' needs the CT loaded from its DICOM "
                                  "folder (or instance_positions_lps)")
        instance_positions_lps = dicom_instance_positions(Path(image.source))
    geometry = image.geometry
    nodules = []
    for row in (r for r in rows if r.get(COLUMNS["series"]) == wanted):
        number = parse_float(row, COLUMNS["slice"], path)
        if number != int(number):
            raise AnnotationError(f"{path} line {row.line}: Slice number {number:g} is not a whole number")
        k = slice_index(int(number), geometry, slice_numbering, first_slice_number, instance_positions_lps)
        if k is None or not 0 <= k < geometry.size[2]:
            raise AnnotationError(f"{path} line {row.line}: Slice number {int(number)} is not a slice of this "
                                  f"CT ({geometry.size[2]} slices, numbered {slice_numbering} from "
                                  f"{first_slice_number}); is this the right series?")
        centre_lps, box_lps, diameter = _box_nodule(row, path, geometry, k)
        try:
            label = parse_label(row.get(COLUMNS["malignancy"]))
        except ValueError as exc:
            raise AnnotationError(f"{path} line {row.line}: malignancy: {exc}") from None
        pid = row.get(COLUMNS["pid"])
        nodule_id = f"{pid}/T{row.get(COLUMNS['study_yr'])}/a{row.get(COLUMNS['abnormality']).removesuffix('.0')}"
        nodules.append(Nodule(centre_lps=tuple(centre_lps), nodule_id=nodule_id, case_id=pid,
                              series_uid=wanted, diameter_mm=diameter, box_lps=box_lps, label=label,
                              source=f"nlstx:{path.name}:{row.line}"))
    return nodules
