"""3D Slicer markups JSON (``.mrk.json``, ``markups-schema-v1.0.x``) ↔ nodules.

Read:

* ``Fiducial`` (point list): every placed control point is a nodule centre; the point's
  ``label`` becomes ``nodule_id``; its ``description`` may say ``benign`` or
  ``malignant`` and carry ``malignancy=…`` and ``diameter_mm=…`` (what ``write_markups``
  writes).
* ``ROI``: its ``center`` is the nodule centre and its box (``center``, ``size`` along the
  ROI axes in ``orientation``) gives ``box_lps`` and a diameter estimate (longest edge).
* ``Line``: a ruler across the nodule; its midpoint is the centre and its length the
  diameter.
* Control points whose ``positionStatus`` is not ``defined`` (not yet placed) are skipped;
  other markup types are ignored.
* ``case_id`` is the file's name without ``.mrk.json`` (``LIDC-IDRI-0001.mrk.json`` →
  ``LIDC-IDRI-0001``): a markups file holds no patient ID, and Slicer names it after the node
  the user saved. The LIDC reader falls back to its XML file's stem the same way.

``coordinateSystem`` is honoured per markup. When it is missing, LPS is used: that is
the schema's default and what Slicer's reader (``vtkMRMLMarkupsJsonStorageNode``)
assumes; Slicer has written LPS by default since the format appeared (4.11).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..errors import AnnotationError
from ..geometry import lps_to_ras, to_lps
from ..nodule import Nodule
from ._common import parse_json, read_text, show

SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
          "Resources/Schema/markups-schema-v1.0.3.json#")
_KEY_VALUE = re.compile(r"\b(malignancy|diameter_mm)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_POSITION_STATUSES = ("defined", "preview", "undefined")
_FIX = "fix the file, or place the point again in Slicer and save the markups again"
log = logging.getLogger(__name__)


def _description_fields(text: str, where: str) -> tuple[int | None, float | None, float | None]:
    """(label, malignancy, diameter_mm) from a free-text control point description."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    says_benign, says_malignant = "benign" in words, "malignant" in words
    label = None if says_benign == says_malignant else int(says_malignant)
    values = {key: float(value) for key, value in _KEY_VALUE.findall(text)}
    malignancy, diameter = values.get("malignancy"), values.get("diameter_mm")
    if malignancy is not None and not 1 <= malignancy <= 5:
        raise AnnotationError(f"{where}: its description says malignancy={malignancy:g}; ratings are 1–5")
    if diameter is not None and not 0 < diameter < math.inf:
        raise AnnotationError(f"{where}: its description says diameter_mm={diameter:g}; it must be a positive "
                              "finite number of millimetres")
    return label, malignancy, diameter


def _vector(value, n: int, where: str) -> np.ndarray:
    """``n`` finite numbers from a JSON list; anything else (a string, null, a nested list,
    another length, NaN, 1e999, a 400-digit integer) is an error naming the value."""
    if not isinstance(value, list) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, list) else show(value)
        raise AnnotationError(f"{where}: expected a list of {n} numbers, got {got}; {_FIX}")
    numbers = []
    for index, item in enumerate(value, start=1):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise AnnotationError(f"{where}: value {index} of {n} is {show(item)}, not a number; {_FIX}")
        try:
            numbers.append(float(item))
        except OverflowError:  # an integer beyond float range
            numbers.append(math.inf)
        if not math.isfinite(numbers[-1]):
            raise AnnotationError(f"{where}: value {index} of {n} is {show(item, 40)}, not a finite number; {_FIX}")
    return np.array(numbers)


def _system(markup: dict, where: str) -> str:
    system = markup.get("coordinateSystem", "LPS")
    if not isinstance(system, str) or system.strip().upper() not in ("LPS", "RAS"):
        raise AnnotationError(f"{where}: coordinateSystem must be 'LPS' or 'RAS', got {system!r}")
    units = markup.get("coordinateUnits", "mm")
    unit = units[0] if isinstance(units, list) and units else units
    if unit != "mm":
        raise AnnotationError(f"{where}: coordinates are in {unit!r}; only millimetres are supported")
    return system.strip().upper()


def _placed_points(markup: dict, system: str, where: str) -> list[tuple[dict, np.ndarray]]:
    """(point, LPS position) of each placed control point; unplaced ones are logged and skipped."""
    control_points = markup.get("controlPoints")
    if control_points is None:
        return []
    if not isinstance(control_points, list):
        raise AnnotationError(f"{where}: controlPoints must be a list of points, got {show(control_points)}")
    points, unplaced = [], []
    for index, point in enumerate(control_points, start=1):
        if not isinstance(point, dict):
            raise AnnotationError(f"{where}, control point {index}: expected an object, got {show(point)}")
        name = f"{where}, control point {index}" + (f" ({show(point['label'], 40)})" if point.get("label") else "")
        status = point.get("positionStatus", "defined")
        if status not in _POSITION_STATUSES:
            raise AnnotationError(f"{name}: positionStatus {show(status)} is not one of "
                                  f"{', '.join(_POSITION_STATUSES)}")
        if status != "defined":
            unplaced.append(f"{index} ({status})")
            continue
        position = _vector(point.get("position"), 3, f"{name} position")
        points.append((point, to_lps(position, system)))
    if unplaced:
        log.warning("%s: skipped %d control point(s) that were never placed (positionStatus not 'defined'): %s",
                    where, len(unplaced), ", ".join(unplaced))
    return points


def _nodule(centre_lps, point: dict, default_id: str, source: str, where: str, **fields) -> Nodule:
    label, malignancy, diameter = _description_fields(str(point.get("description") or ""), where)
    return Nodule(centre_lps=tuple(centre_lps), nodule_id=str(point.get("label") or default_id),
                  label=label, malignancy=malignancy, source=source,
                  diameter_mm=fields.pop("diameter_mm", None) or diameter, **fields)


def _roi_nodule(markup: dict, system: str, where: str, default_id: str, source: str) -> Nodule | None:
    points = _placed_points(markup, system, where)
    if "center" in markup:
        centre_lps = to_lps(_vector(markup["center"], 3, f"{where} center"), system)
    elif points:
        centre_lps = np.mean([p for _, p in points], axis=0)
    else:
        return None
    size = _vector(markup.get("size", [0, 0, 0]), 3, f"{where} size")
    if (size < 0).any():
        raise AnnotationError(f"{where}: size {size.tolist()} has a negative edge; {_FIX}")
    axes = _vector(markup.get("orientation", [1, 0, 0, 0, 1, 0, 0, 0, 1]), 9, f"{where} orientation").reshape(3, 3)
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-3):
        raise AnnotationError(f"{where}: orientation {axes.ravel().tolist()} is not a rotation (its axes must be "
                              f"unit length and perpendicular); {_FIX}")
    axes = to_lps(axes.T, system).T  # columns are the ROI axes
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * size / 2
    world = centre_lps + corners @ axes.T
    box = (tuple(world.min(axis=0)), tuple(world.max(axis=0))) if size.any() else None
    point = points[0][0] if points else {}
    name = markup.get("name") or default_id
    return _nodule(centre_lps, {**point, "label": point.get("label") or name}, default_id, source, where,
                   box_lps=box, diameter_mm=float(size.max()) if size.any() else None)


def case_id_of(path: Path) -> str:
    """The case a markups file stands for: its name without ``.mrk.json`` / ``.json``."""
    name = path.name
    for suffix in (".mrk.json", ".json"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return path.stem


def load_markups(path: str | Path) -> list[Nodule]:
    """Nodules from a Slicer ``.mrk.json`` (point lists, ROIs and lines) in LPS mm."""
    path = Path(path)
    text = read_text(path, "markups")
    if not text.strip():
        raise AnnotationError(f"markups file {path} is empty")
    document = parse_json(text, path, "markups")
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise AnnotationError(f"{path} is not a Slicer markups file: it has no 'markups' list "
                              "(expected {\"@schema\": \"…markups-schema-v1.0.x.json#\", \"markups\": [...]})")
    nodules, types = [], []
    for m_index, markup in enumerate(markups, start=1):
        where = f"{path}, markup {m_index}"
        if not isinstance(markup, dict):
            raise AnnotationError(f"{where}: expected an object, got {show(markup)}")
        kind = markup.get("type")
        types.append(str(kind))
        system = _system(markup, where)
        source = f"markups:{path.name}"
        if kind == "Fiducial":
            for index, (point, centre_lps) in enumerate(_placed_points(markup, system, where), start=1):
                nodules.append(_nodule(centre_lps, point, f"{markup.get('name') or 'F'}-{index}", source,
                                       f"{where}, control point {index}"))
        elif kind == "ROI":
            roi = _roi_nodule(markup, system, where, f"ROI-{m_index}", source)
            nodules.extend([roi] if roi is not None else [])
        elif kind == "Line":
            points = _placed_points(markup, system, where)
            if len(points) == 2:
                (first, a), (_, b) = points
                nodules.append(_nodule((a + b) / 2, {**first, "label": markup.get("name") or first.get("label")},
                                       f"L-{m_index}", source, where, diameter_mm=float(np.linalg.norm(a - b))))
            else:
                log.warning("%s: a line needs 2 placed points, it has %d; skipped", where, len(points))
    if not nodules:
        raise AnnotationError(f"{path} has no placed points, ROIs or lines (markup types found: "
                              f"{', '.join(types) or 'none'}); place a point on each nodule in Slicer")
    case_id = case_id_of(path)
    for nodule in nodules:
        nodule.case_id = case_id
    return nodules


def _description(nodule: Nodule) -> str:
    parts = [] if nodule.label is None else [("benign", "malignant")[int(nodule.label)]]
    if nodule.malignancy is not None:
        parts.append(f"malignancy={nodule.malignancy:g}")
    if nodule.diameter_mm is not None:
        parts.append(f"diameter_mm={nodule.diameter_mm:.2f}")
    return "; ".join(parts)


def write_markups(nodules: list[Nodule], path: str | Path, coordinate_system: str = "LPS",
                  name: str = "Nodules") -> Path:
    """Write nodules as one Slicer point list (atomically); Slicer ≥ 4.11 loads it."""
    system = coordinate_system.strip().upper()
    if system not in ("LPS", "RAS"):
        raise AnnotationError(f"coordinate_system must be 'LPS' or 'RAS', got {coordinate_system!r}")
    points = []
    for index, nodule in enumerate(nodules, start=1):
        centre = np.asarray(nodule.centre_lps, dtype=float)
        position = lps_to_ras(centre) if system == "RAS" else centre
        points.append({
            "id": str(index), "label": nodule.nodule_id or f"{name}-{index}",
            "description": _description(nodule), "associatedNodeID": "",
            "position": [float(v) for v in position],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0] if system == "LPS"
            else [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": False, "visibility": True, "positionStatus": "defined",
        })
    document = {"@schema": SCHEMA, "markups": [{
        "type": "Fiducial", "name": name, "coordinateSystem": system, "coordinateUnits": "mm",
        "locked": False, "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(points), "controlPoints": points,
        "display": {"pointLabelsVisibility": True, "glyphType": "Sphere3D"},
    }]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(document, indent=2))
