"""Score every marked nodule in every loaded study, into one table.

Which markups belong to which volume: the volume's ``MedLoRA.markups`` node reference,
else the only point list or ROI in the same subject-hierarchy study, else the caller
is asked (the widget shows a dialog; scripts pass a function or get the volume
skipped with a reason). Studies are scored one after another so the user can cancel
between them; a study that fails is reported in its rows and the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MedLoRAError
from .mrml import markups_for_volume
from .results import ScoreRow, write_table

AskMarkups = Callable[[object, list], object]


@dataclass
class Study:
    """One volume with the markups to score on it (``None`` when none was found)."""

    volume: object
    markups: object | None
    found_by: str  # "reference", "subject hierarchy", "asked" or why it is missing


def _markups_nodes(scene) -> list:
    return [n for cls in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode")
            for n in scene.GetNodesByClass(cls) if n.GetNumberOfControlPoints() or n.IsA("vtkMRMLMarkupsROINode")]


def _study_markups(scene, volume) -> list:
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return []
    volume_item = hierarchy.GetItemByDataNode(volume)
    study = hierarchy.GetItemParent(volume_item) if volume_item else 0
    if not study or study == hierarchy.GetSceneItemID() or hierarchy.GetItemLevel(study) != "Study":
        return []
    return [n for n in _markups_nodes(scene) if hierarchy.GetItemParent(hierarchy.GetItemByDataNode(n)) == study]


def find_studies(scene, ask: AskMarkups | None = None) -> list[Study]:
    """Every scalar volume (not label maps) in the scene with its markups."""
    studies = []
    for volume in scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
        if volume.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        referenced = markups_for_volume(volume)
        if referenced is not None:
            studies.append(Study(volume, referenced, "reference"))
            continue
        in_study = _study_markups(scene, volume)
        if len(in_study) == 1:
            studies.append(Study(volume, in_study[0], "subject hierarchy"))
            continue
        candidates = in_study or _markups_nodes(scene)
        chosen = ask(volume, candidates) if ask is not None and candidates else None
        studies.append(Study(volume, chosen, "asked") if chosen is not None else
                       Study(volume, None, "no markups linked to this volume (set them in the MedLoRA module)"))
    return studies


@dataclass
class BatchScoring:
    """Scores the studies one by one; ``step`` does one study (call it from a timer or a loop).

    Args:
        logic: the ``SceneLogic`` that scores one volume.
        studies: from ``find_studies``.
        adapter: adapter name (default: the active one).
        progress: called with (studies done, studies in all, volume name) after each study.
    """

    logic: object
    studies: list[Study]
    adapter: str | None = None
    progress: Callable[[int, int, str], None] | None = None
    rows: list[ScoreRow] = field(default_factory=list)
    done: int = 0
    cancelled: bool = False
    table_node: object = None

    @property
    def finished(self) -> bool:
        return self.cancelled or self.done >= len(self.studies)

    def cancel(self) -> None:
        """Stop before the next study; the rows so far stay in the table."""
        self.cancelled = True

    def step(self) -> bool:
        """Score the next study; returns False when there is nothing left to do."""
        if self.finished:
            return False
        study = self.studies[self.done]
        name = study.volume.GetName()
        if study.markups is None:
            self.rows.append(ScoreRow(volume=name, nodule="", point_id="", r=float("nan"), a=float("nan"),
                                      s=float("nan"), error=study.found_by))
        else:
            try:
                _, rows = self.logic.score(study.volume, study.markups, adapter=self.adapter,
                                              write_results_table=False)
            except MedLoRAError as exc:
                rows = [ScoreRow(volume=name, nodule="", point_id="", r=float("nan"), a=float("nan"),
                                 s=float("nan"), error=str(exc))]
            self.rows.extend(rows)
        self.done += 1
        self.table_node = write_table(self.logic.scene, self.rows, self.table_node, name="MedLoRA batch results")
        if self.progress is not None:
            self.progress(self.done, len(self.studies), name)
        return not self.finished

    def run(self) -> list[ScoreRow]:
        while self.step():
            pass
        return self.rows
