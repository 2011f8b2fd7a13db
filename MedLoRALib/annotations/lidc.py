"""LIDC-IDRI radiologist reads (``LidcReadMessage`` XML) → one Nodule per physical nodule.

What the LIDC protocol puts in a read, and what is kept (Armato et al. 2011, the LIDC
XML documentation):

* ``unblindedReadNodule`` with an outline (``roi``/``edgeMap``) and ``characteristics``:
  a nodule ≥ 3 mm. Kept, with the reader's malignancy rating (1–5).
* ``unblindedReadNodule`` with one edge-map point and no characteristics: a nodule
  < 3 mm (only its approximate centre is marked, it is never rated). Skipped unless
  ``include_small=True``; such nodules get no label.
* ``nonNodule``: a lesion ≥ 3 mm the reader judged not to be a nodule. Never kept.
* ``roi`` with ``inclusion`` FALSE: a hole inside the nodule's outline; its interior is
  removed from the nodule region.

Each reader's nodule centre is the centroid of its region (outline plus interior, all
slices) in voxel indices, mapped to LPS with the series geometry. Edge-map ``xCoord`` is
the column (i) and ``yCoord`` the row (j). The slice (k) of a ``roi`` comes from its
``imageSOP_UID`` when the CT's DICOM headers are at hand (exact for any direction
matrix), otherwise from ``imageZposition``, which LIDC takes from the slice's
ImagePositionPatient z — the LPS z of pixel (0, 0) of the slice, *not* of its centre —
so for a tilted grid it is matched against ``ijk_to_lps((0, 0, k)).z``.

Grouping rule: marks by different readers are the same nodule when their centres lie
within ``max(group_distance_mm, larger diameter / 2)``; candidate pairs are merged
closest first (single linkage) and a merge that would put two marks of one reader in
one nodule is refused. The consensus centre is the mean of the marks' centres; the
diameter is the mean of the readers' longest in-plane diameters.
"""

from __future__ import annotations

import itertools
import math
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AnnotationError
from ..geometry import Geometry
from ..image import CTImage
from ..nodule import Nodule
from ._common import dicom_positions_by, read_text, show

SMALL_NODULE_MM = 3.0
# How far (in slices) a roi's position may sit from the nearest slice centre.
SLICE_TOLERANCE = 0.25


def lidc_label(median_malignancy: float | None) -> int | None:
    """The LIDC/MedMNIST rule: median ≤ 2 benign (0), ≥ 4 malignant (1), otherwise None.

    Medians strictly between 2 and 4 (3, and the half-steps 2.5 and 3.5 that an even
    number of readers can give) are indeterminate and excluded.
    """
    if median_malignancy is None:
        return None
    if median_malignancy <= 2:
        return 0
    if median_malignancy >= 4:
        return 1
    return None


def median_malignancy(nodule: Nodule) -> float | None:
    """Median of the readers' malignancy ratings (the value the label is derived from)."""
    return float(statistics.median(nodule.ratings)) if nodule.ratings else None


@dataclass(frozen=True)
class _Roi:
    z_position: float
    sop_uid: str
    inclusion: bool
    cols_rows: np.ndarray  # (n, 2) edge-map pixels: column (x), row (y)


@dataclass
class ReaderMark:
    """One reader's mark of one nodule, located in the CT."""

    reader: str
    reader_nodule_id: str
    centre_lps: np.ndarray
    diameter_mm: float | None
    malignancy: int | None


# --- XML ---------------------------------------------------------------------------
def _strip_namespaces(root: ET.Element) -> ET.Element:
    for element in root.iter():
        if isinstance(element.tag, str) and "}" in element.tag:
            element.tag = element.tag.split("}", 1)[1]
    return root


def _parse_xml(path: Path) -> ET.Element:
    text = read_text(path, "LIDC XML")
    if not text.strip():
        raise AnnotationError(f"LIDC XML file {path} is empty")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:  # entity expansion ("billion laughs") needs a DTD
        raise AnnotationError(f"LIDC XML file {path} declares a DTD or entities, which LIDC reads never do; "
                              "refusing to expand them. Is this the LIDC XML of the case?")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        line, column = exc.position
        raise AnnotationError(f"LIDC XML file {path} is malformed at line {line}, column {column} "
                              f"({exc}); is the file complete?") from None
    root = _strip_namespaces(root)
    if root.tag != "LidcReadMessage":
        raise AnnotationError(f"{path} is not a LIDC CT read (root element <{root.tag}>, expected "
                              "<LidcReadMessage>; <IdriReadMessage> files are chest radiograph reads)")
    return root


def _text(element: ET.Element, tag: str) -> str:
    found = element.find(tag)
    return (found.text or "").strip() if found is not None else ""


def _roi(element: ET.Element, path: Path, where: str) -> _Roi:
    z_text, sop = _text(element, "imageZposition"), _text(element, "imageSOP_UID")
    try:
        z = float(z_text)
    except ValueError:
        z = math.nan
    if not math.isfinite(z):
        raise AnnotationError(f"{path}: {where} has no valid <imageZposition> (got {show(z_text)}); "
                              "is the XML complete?") from None
    points = []
    for edge in element.findall("edgeMap"):
        try:
            points.append((int(_text(edge, "xCoord")), int(_text(edge, "yCoord"))))
        except ValueError:
            raise AnnotationError(f"{path}: {where} has an <edgeMap> without integer "
                                  "<xCoord>/<yCoord>") from None
    if not points:
        raise AnnotationError(f"{path}: {where} (z {z}) has no <edgeMap> points")
    inclusion = _text(element, "inclusion").upper() != "FALSE"
    return _Roi(z, sop, inclusion, np.array(points, dtype=float))


# --- slice lookup ---------------------------------------------------------------------
class SliceLocator:
    """Finds the slice index k of a roi from its SOP UID or its ImagePositionPatient z."""

    def __init__(self, geometry: Geometry, sop_positions_lps: dict[str, np.ndarray] | None = None):
        self.geometry = geometry
        self.sop_positions_lps = sop_positions_lps or {}

    def slice_index(self, roi: _Roi, path: Path, where: str) -> int:
        g = self.geometry
        position = self.sop_positions_lps.get(roi.sop_uid)
        if position is not None:
            k = float(g.lps_to_ijk(position)[2])
            basis = f"SOP {roi.sop_uid}"
        else:
            step_z = g.spacing[2] * g.direction[2, 2]
            if abs(g.direction[2, 2]) < 0.5:
                raise AnnotationError(
                    f"{path}: {where}: the CT's slices are not axial, so imageZposition cannot "
                    "locate them; load the CT from its DICOM folder so the slices' SOP UIDs are known")
            k = (roi.z_position - g.origin_lps[2]) / step_z
            basis = f"imageZposition {roi.z_position:g} mm"
        nearest = int(round(k))
        if abs(k - nearest) > SLICE_TOLERANCE or not 0 <= nearest < g.size[2]:
            lo, hi = sorted(float(g.ijk_to_lps((0, 0, kk))[2]) for kk in (0, g.size[2] - 1))
            raise AnnotationError(
                f"{path}: {where}: {basis} matches no slice of this CT (slice index {k:.2f}; slice "
                f"z runs {lo:.2f}…{hi:.2f} mm every {g.spacing[2]:.3g} mm). Is the XML for this series?")
        return nearest


def dicom_slice_positions(folder: Path) -> dict[str, np.ndarray]:
    """SOPInstanceUID → ImagePositionPatient (LPS mm) for every DICOM image under ``folder``."""
    return dicom_positions_by(folder, "SOPInstanceUID")


# --- one reader's region --------------------------------------------------------------
def _inside_polygon(cols: np.ndarray, rows: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd test of pixel centres (cols, rows) against a closed polygon (n, 2)."""
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    px, py = cols[..., None], rows[..., None]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return np.count_nonzero(crosses & (px < x_cross), axis=-1) % 2 == 1


def _slice_region(rois: list[_Roi]) -> np.ndarray:
    """(n, 2) pixel (column, row) list of one slice's region: outlines and their interiors,
    minus what lies strictly inside exclusion outlines (outline pixels stay in the region,
    so the result does not depend on which side of a pixel the polygon edge passes)."""
    every = np.concatenate([r.cols_rows for r in rois])
    (c0, r0), (c1, r1) = every.min(axis=0).astype(int), every.max(axis=0).astype(int)
    rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1].astype(float)
    mask = np.zeros(cols.shape, dtype=bool)
    def outline(roi: _Roi) -> np.ndarray:
        on = np.zeros(cols.shape, dtype=bool)
        ci, ri = roi.cols_rows.astype(int).T
        on[ri - r0, ci - c0] = True
        return on

    for roi in (r for r in rois if r.inclusion):
        mask |= _inside_polygon(cols, rows, roi.cols_rows) | outline(roi)
    for roi in (r for r in rois if not r.inclusion):
        mask &= ~(_inside_polygon(cols, rows, roi.cols_rows) & ~outline(roi))
    return np.stack([cols[mask], rows[mask]], axis=1)


def _longest_diameter_mm(rois: list[_Roi], spacing: tuple[float, float, float]) -> float:
    """Longest in-plane distance between outline points on any one slice (LIDC's diameter)."""
    longest = 0.0
    for roi in rois:
        mm = roi.cols_rows * np.asarray(spacing[:2])
        if len(mm) > 1:
            d = np.sqrt(((mm[:, None, :] - mm[None, :, :]) ** 2).sum(-1)).max()
            longest = max(longest, float(d))
    return longest


def _check_in_slice(rois: list[_Roi], geometry: Geometry, path: Path, where: str) -> None:
    """Edge-map pixels must lie in the CT's slices (a 10⁹ coordinate would also ask for a
    10⁹-pixel region mask)."""
    columns, rows = geometry.size[0], geometry.size[1]
    for roi in rois:
        outside = (roi.cols_rows < 0).any(axis=1) | (roi.cols_rows[:, 0] >= columns) | (roi.cols_rows[:, 1] >= rows)
        if outside.any():
            x, y = roi.cols_rows[np.argmax(outside)].astype(int)
            raise AnnotationError(f"{path}: {where}: edge-map point (x {x}, y {y}) at z {roi.z_position:g} lies "
                                  f"outside the CT's {columns}×{rows}-pixel slices; is the XML for this series?")


def _reader_mark(reader: str, nodule: ET.Element, path: Path, locator: SliceLocator) -> ReaderMark:
    nodule_id = _text(nodule, "noduleID") or "?"
    where = f"reader {reader}, nodule {show(nodule_id, 60)}"
    rois = [_roi(r, path, where) for r in nodule.findall("roi")]
    if not rois:
        raise AnnotationError(f"{path}: {where} has no <roi>")
    _check_in_slice(rois, locator.geometry, path, where)
    by_slice: dict[int, list[_Roi]] = {}
    for roi in rois:
        by_slice.setdefault(locator.slice_index(roi, path, where), []).append(roi)
    ijk = [np.column_stack([pixels, np.full(len(pixels), k)])
           for k, slice_rois in by_slice.items() if len(pixels := _slice_region(slice_rois))]
    if not ijk:
        raise AnnotationError(f"{path}: {where}: its exclusion outlines remove its whole region")
    centre_lps = locator.geometry.ijk_to_lps(np.concatenate(ijk).mean(axis=0))
    included = [r for r in rois if r.inclusion]
    small = all(len(r.cols_rows) == 1 for r in included)
    diameter = None if small else _longest_diameter_mm(included, locator.geometry.spacing)
    rating_text = _text(nodule, "characteristics/malignancy")
    try:
        rating = int(rating_text) if rating_text else None
    except ValueError:
        raise AnnotationError(f"{path}: {where}: malignancy {rating_text!r} is not an integer 1–5") from None
    if rating is not None and not 1 <= rating <= 5:
        raise AnnotationError(f"{path}: {where}: malignancy {rating} is outside 1–5")
    return ReaderMark(reader, nodule_id, centre_lps, diameter, rating)


def _is_small(nodule: ET.Element) -> bool:
    """LIDC's < 3 mm nodules: one edge-map point per roi and no characteristics."""
    rois = nodule.findall("roi")
    points = [len(r.findall("edgeMap")) for r in rois]
    return bool(rois) and max(points) <= 1 and nodule.find("characteristics/malignancy") is None


# --- grouping -------------------------------------------------------------------------
def group_marks(marks: list[ReaderMark], group_distance_mm: float = 5.0) -> list[list[ReaderMark]]:
    """Group readers' marks into nodules (see the module docstring for the rule)."""
    parent = list(range(len(marks)))
    readers = [{m.reader} for m in marks]

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = []
    for a, b in itertools.combinations(range(len(marks)), 2):
        if marks[a].reader == marks[b].reader:
            continue
        distance = float(np.linalg.norm(marks[a].centre_lps - marks[b].centre_lps))
        radius = max(marks[a].diameter_mm or 0.0, marks[b].diameter_mm or 0.0) / 2
        if distance <= max(group_distance_mm, radius):
            pairs.append((distance, a, b))
    for _, a, b in sorted(pairs):
        ra, rb = root(a), root(b)
        if ra != rb and not readers[ra] & readers[rb]:
            parent[rb] = ra
            readers[ra] |= readers[rb]
    groups: dict[int, list[ReaderMark]] = {}
    for i, mark in enumerate(marks):
        groups.setdefault(root(i), []).append(mark)
    return list(groups.values())


def consensus(group: list[ReaderMark], nodule_id: str, case_id: str, series_uid: str,
               source: str) -> Nodule:
    ratings = tuple(m.malignancy for m in group if m.malignancy is not None)
    diameters = [m.diameter_mm for m in group if m.diameter_mm is not None]
    median = float(statistics.median(ratings)) if ratings else None
    return Nodule(
        centre_lps=tuple(np.mean([m.centre_lps for m in group], axis=0)),
        nodule_id=nodule_id, case_id=case_id, series_uid=series_uid,
        diameter_mm=float(np.mean(diameters)) if diameters else None,
        label=lidc_label(median),
        malignancy=float(np.mean(ratings)) if ratings else None,
        ratings=ratings, reader_count=len(group), source=source)


def _no_nodule_reason(path: Path, readers: int, groups: list[list[ReaderMark]], small: int, min_readers: int) -> str:
    """Why a LIDC XML yields no nodule, in the terms of the options that decide it."""
    if groups:
        most = max(len(g) for g in groups)
        return (f"{path}: none of its {len(groups)} nodule(s) was marked by at least {min_readers} of the "
                f"{readers} readers (the most any nodule has is {most}); lower min_readers (--min-readers) "
                f"to {most} or less")
    skipped = f"; {small} nodule(s) < 3 mm were skipped (include_small=True keeps them)" if small else ""
    return f"{path}: its {readers} reader(s) marked no nodule ≥ 3 mm{skipped}"


# --- entry point ----------------------------------------------------------------------
def load_lidc_xml(path: str | Path, image: CTImage, *, min_readers: int = 1, include_small: bool = False,
                  group_distance_mm: float = 5.0,
                  sop_positions_lps: dict[str, np.ndarray] | None = None) -> list[Nodule]:
    """Read a LIDC XML into consensus nodules located in ``image`` (LPS mm).

    Args:
        path: the ``LidcReadMessage`` XML.
        image: the CT series the reads were made on (its geometry places the outlines).
        min_readers: keep nodules marked by at least this many readers (1–4).
        include_small: also keep < 3 mm nodules (centre only, never rated, no label).
        group_distance_mm: floor of the distance under which two readers' marks are one nodule.
        sop_positions_lps: SOPInstanceUID → ImagePositionPatient; read from the DICOM
            folder the CT was loaded from when not given.
    """
    path = Path(path)
    if isinstance(min_readers, bool) or not isinstance(min_readers, int) or min_readers < 1:
        raise AnnotationError(f"min_readers must be at least 1, got {show(min_readers)}")
    if image is None:
        raise AnnotationError(f"{path}: LIDC XML outlines are in pixel coordinates; pass the CT "
                              "series they were drawn on (image=...) to place them")
    root = _parse_xml(path)
    series_uid = _text(root, "ResponseHeader/SeriesInstanceUid")
    if series_uid and image.ids.series_uid and series_uid != image.ids.series_uid:
        raise AnnotationError(
            f"{path} holds reads of series {show(series_uid, 90)}, but the CT loaded is series "
            f"{show(image.ids.series_uid, 90)}: the outlines would land on the wrong slices. Load the series the "
            "XML names (e.g. --series-uid with a folder holding several series), or use this series' own XML")
    if sop_positions_lps is None and image.source and Path(image.source).is_dir():
        sop_positions_lps = dicom_slice_positions(Path(image.source))
    locator = SliceLocator(image.geometry, sop_positions_lps)
    sessions = root.findall("readingSession")
    if not sessions:
        raise AnnotationError(f"{path} has no <readingSession>: no reads to import")
    if min_readers > len(sessions):
        raise AnnotationError(f"min_readers (--min-readers) {min_readers} is more than the {len(sessions)} "
                              f"reader(s) in {path}: no nodule can have been marked by {min_readers}; use at most "
                              f"{len(sessions)}")
    marks, small = [], 0
    for index, session in enumerate(sessions, start=1):
        reader = _text(session, "servicingRadiologistID") or f"reader{index}"
        reader = f"{index}:{reader}"  # IDs can repeat or be blank across sessions
        for nodule in session.findall("unblindedReadNodule"):
            if _is_small(nodule) and not include_small:
                small += 1
                continue
            marks.append(_reader_mark(reader, nodule, path, locator))
    all_groups = group_marks(marks, group_distance_mm)
    groups = [g for g in all_groups if len(g) >= min_readers]
    if not groups:
        raise AnnotationError(_no_nodule_reason(path, len(sessions), all_groups, small, min_readers))
    groups.sort(key=lambda g: (-len(g), -float(np.mean([m.centre_lps[2] for m in g]))))
    case_id = image.ids.patient_id or path.stem
    source = f"lidc-xml:{path.name}"
    return [consensus(g, f"{case_id}/n{i}", case_id, series_uid, source)
            for i, g in enumerate(groups, start=1)]
