"""Scores in the scene: a results table node, coloured control points, CSV export.

The table has one row per nodule and keeps working after a ``.mrb`` save and reload
(typed columns are stored in the table's schema file). A markups node has two point
colours (plain and selected), so the selected flag carries the score: points positive
at the adapter's threshold are selected and drawn red, the others green. A point that
could not be scored is unselected and its label says "not scored", so colour alone never
passes for a result. Labels also name the adapter, because the number depends on it.
Descriptions the user wrote (e.g. a training label) are never overwritten.

Scored with an ensemble (several adapters, ``ensemble.py``), a row's probability is the members'
mean; ``Spread`` (their standard deviation) and ``Disagree`` (their own labels differ) say how far
to trust it, and one ``P <adapter>`` column per member holds that member's probability. Single-adapter
rows leave Spread empty (NaN) and Disagree blank.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_path
from ..errors import MedLoRAError

MALIGNANT_RGB = (0.90, 0.10, 0.10)
BENIGN_RGB = (0.10, 0.80, 0.20)
NOT_SCORED = "not scored"
_SCORE_SUFFIX = re.compile(r" · (\d{1,3}% .*|\d{1,3}%|not scored|error)$")
DESCRIPTION_PREFIX = "MedLoRA:"
LABEL_TEXT = {0: "benign", 1: "malignant", None: ""}  # default class names (an adapter may name its own)
MEMBER_PREFIX = "P "  # column title of an ensemble member's probability: "P site-a"


@dataclass
class ScoreRow:
    """One nodule's result (``error`` set instead of a probability when it could not be scored)."""

    volume: str
    nodule: str
    point_id: str
    r: float
    a: float
    s: float
    probability: float | None = None
    label: int | None = None
    adapter: str = ""
    adapter_version: str = ""
    random_init: bool = False
    error: str = ""
    label_name: str = ""
    spread: float | None = None  # ensembles: the members' standard deviation
    disagree: bool | None = None  # ensembles: the members' own labels differ
    members: dict[str, float] = field(default_factory=dict)  # ensembles: member adapter -> its probability
    tta: str = ""  # the test-time augmentation set the engine scored with ("rot4"; "" in tables saved before)

    def __post_init__(self) -> None:
        if not self.label_name and self.label is not None:
            self.label_name = LABEL_TEXT[self.label]


# column title, ScoreRow field, vtk array kind
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Volume", "volume", "string"), ("Nodule", "nodule", "string"), ("Point ID", "point_id", "string"),
    ("R", "r", "double"), ("A", "a", "double"), ("S", "s", "double"),
    ("Probability", "probability", "double"), ("Label", "label_name", "string"), ("Class", "label", "string"),
    ("Spread", "spread", "double"), ("Disagree", "disagree", "string"), ("Adapter", "adapter", "string"), ("Adapter version", "adapter_version", "string"),
    ("Random init", "random_init", "string"), ("TTA", "tta", "string"), ("Error", "error", "string"),
)
ENSEMBLE_COLUMNS = ("Spread", "Disagree")  # tables saved before ensembles lack them
OPTIONAL_COLUMNS = (*ENSEMBLE_COLUMNS, "TTA")  # ... and tables saved before the TTA set was recorded


def _cell(row: ScoreRow, field_name: str):
    value = getattr(row, field_name)
    if field_name in ("probability", "spread"):
        return float("nan") if value is None else float(value)
    if field_name == "label":
        return "" if value is None else str(value)
    if field_name == "random_init":
        return "yes" if value else "no"
    if field_name == "disagree":
        return "" if value is None else ("yes" if value else "no")
    return value


def member_names(rows: list[ScoreRow]) -> list[str]:
    """Every ensemble member named in ``rows``, in the order first met."""
    return list(dict.fromkeys(name for row in rows for name in row.members))


def write_table(scene, rows: list[ScoreRow], table_node=None, name: str = "MedLoRA results"):
    """Fill (or create) a table node with one row per result."""
    import vtk

    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    was_modifying = table_node.StartModify()
    table = table_node.GetTable()
    table.Initialize()
    for title, field_name, kind in COLUMNS:
        column = vtk.vtkDoubleArray() if kind == "double" else vtk.vtkStringArray()
        column.SetName(title)
        column.SetNumberOfValues(len(rows))
        for index, row in enumerate(rows):
            value = _cell(row, field_name)
            column.SetValue(index, value if kind == "double" else str(value))
        table.AddColumn(column)
    for member in member_names(rows):
        column = vtk.vtkDoubleArray()
        column.SetName(MEMBER_PREFIX + member)
        column.SetNumberOfValues(len(rows))
        for index, row in enumerate(rows):
            column.SetValue(index, row.members.get(member, float("nan")))
        table.AddColumn(column)
    if hasattr(table_node, "SetUseColumnTitleAsColumnHeader"):  # Slicer >= 5.6.1; 5.4 shows the names
        table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetAttribute("MedLoRA.results", "1")
    table_node.Modified()
    table_node.EndModify(was_modifying)
    return table_node


def read_table(table_node) -> list[ScoreRow]:
    """The rows of a results table node (e.g. after reloading a scene)."""
    table = table_node.GetTable()
    titles = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    missing = [title for title, _, _ in COLUMNS if title not in titles and title not in OPTIONAL_COLUMNS]
    if missing:
        raise MedLoRAError(f"table '{table_node.GetName()}' is not a MedLoRA results table (missing columns: "
                           f"{', '.join(missing)}).")
    rows = []
    for index in range(table.GetNumberOfRows()):
        values = {}
        for title, field_name, _kind in COLUMNS:
            if title in titles:
                values[field_name] = _from_cell(field_name, table.GetColumnByName(title).GetValue(index))
        members = {title[len(MEMBER_PREFIX):]: float(table.GetColumnByName(title).GetValue(index))
                   for title in titles if title.startswith(MEMBER_PREFIX)}
        rows.append(ScoreRow(**values, members={k: v for k, v in members.items() if v == v}))
    return rows


def _from_cell(field_name: str, raw):
    if field_name in ("r", "a", "s"):
        return float(raw)
    if field_name in ("probability", "spread"):
        value = float(raw)
        return None if value != value else value  # NaN: not scored (or no ensemble)
    if field_name == "label":
        return {"0": 0, "1": 1}.get(str(raw))
    if field_name == "random_init":
        return str(raw) == "yes"
    if field_name == "disagree":
        return {"yes": True, "no": False}.get(str(raw))
    return str(raw)


def base_label(label: str) -> str:
    """A control point label without the score MedLoRA appended to it."""
    return _SCORE_SUFFIX.sub("", label)


def score_suffix(row: ScoreRow) -> str:
    """What follows a point's name in the views: ``87% site-a``, or ``not scored``."""
    if row.error or row.probability is None:
        return NOT_SCORED
    spread = "" if row.spread is None else f" ±{round(100 * row.spread):d}"
    return (f"{round(100 * row.probability):d}%{spread} {row.adapter}" + (" (disagree)" if row.disagree else "")
            + (" (random-init)" if row.random_init else ""))


def _description(row: ScoreRow) -> str:
    if row.error or row.probability is None:
        return f"{DESCRIPTION_PREFIX} {NOT_SCORED}: {row.error or 'no result'}"
    ensemble = "" if row.spread is None else (
        f"; ensemble spread {row.spread:.3f}, the adapters {'disagree' if row.disagree else 'agree'} at their "
        "thresholds (" + ", ".join(f"{name} {p:.3f}" for name, p in row.members.items()) + ")")
    return (f"{DESCRIPTION_PREFIX} probability {row.probability:.3f}, {row.label_name or 'unlabelled'} at the "
            f"adapter's threshold (adapter {row.adapter} {row.adapter_version}){ensemble}"
            + (" — RANDOM-INIT BACKBONE, not a real score" if row.random_init else ""))


def colour_control_points(markups_node, rows: list[ScoreRow]) -> None:
    """Colour, label and describe the scored control points of one markups node."""
    display = markups_node.GetDisplayNode()
    if display is None:
        markups_node.CreateDefaultDisplayNodes()
        display = markups_node.GetDisplayNode()
    display.SetSelectedColor(*MALIGNANT_RGB)
    display.SetColor(*BENIGN_RGB)
    display.SetActiveColor(*MALIGNANT_RGB)
    by_id = {row.point_id: row for row in rows}
    was_modifying = markups_node.StartModify()
    for index in range(markups_node.GetNumberOfControlPoints()):
        row = by_id.get(markups_node.GetNthControlPointID(index))
        if row is None:
            continue
        name = base_label(markups_node.GetNthControlPointLabel(index))
        markups_node.SetNthControlPointLabel(index, f"{name} · {score_suffix(row)}")
        markups_node.SetNthControlPointSelected(index, row.label == 1 and not row.error)
        description = markups_node.GetNthControlPointDescription(index)
        if not description or description.startswith(DESCRIPTION_PREFIX):
            markups_node.SetNthControlPointDescription(index, _description(row))
    markups_node.EndModify(was_modifying)


def result_position_ras(table_node, row_index: int) -> tuple[float, float, float] | None:
    """World RAS of a results-table row (to centre the views on it); ``None`` for rows without a point."""
    if table_node is None or not 0 <= row_index < table_node.GetNumberOfRows():
        return None
    table = table_node.GetTable()
    columns = [table.GetColumnByName(name) for name in ("R", "A", "S")]
    if any(column is None for column in columns):
        raise MedLoRAError(f"table '{table_node.GetName()}' is not a MedLoRA results table (no R, A, S columns).")
    position = tuple(float(column.GetValue(row_index)) for column in columns)
    return None if any(v != v for v in position) else position


def export_csv(rows: list[ScoreRow], path: str | os.PathLike) -> Path:
    """Write the results as a points CSV (RAS, one row per nodule), atomically.

    Predictions go in ``predicted_*`` columns, never ``label``: a points CSV's ``label``
    is the truth a training manifest learns from.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    members = member_names(rows)
    names = ["volume", "nodule_id", "point_id", "x", "y", "z", "coordinate_system", "probability",
             "predicted_label", "predicted_class", "adapter", "adapter_version", "random_init", "error",
             *(("spread", "disagree") if members else ()), *(f"p_{m}" for m in members)]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            for row in rows:
                writer.writerow({
                    "volume": row.volume, "nodule_id": row.nodule, "point_id": row.point_id,
                    "x": f"{row.r:.3f}", "y": f"{row.a:.3f}", "z": f"{row.s:.3f}", "coordinate_system": "RAS",
                    "probability": "" if row.probability is None else f"{row.probability:.6f}",
                    "predicted_label": row.label_name, "predicted_class": "" if row.label is None else row.label,
                    "adapter": row.adapter,
                    "adapter_version": row.adapter_version, "random_init": int(row.random_init),
                    "error": row.error,
                    **({"spread": "" if row.spread is None else f"{row.spread:.6f}",
                        "disagree": "" if row.disagree is None else int(row.disagree)} if members else {}),
                    **{f"p_{m}": f"{row.members[m]:.6f}" if m in row.members else "" for m in members}})
    return path
