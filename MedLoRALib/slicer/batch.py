"""Score every marked nodule in every loaded study, into one table.

Which markups belong to which volume: the volume's ``MedLoRA.markups`` node reference,
else the only point list or ROI in the same subject-hierarchy study, else the caller
is asked (the widget shows a dialog; scripts pass a function or get the volume
skipped with a reason). Studies are scored one after another so the user can cancel
between them; a study that fails is reported in its rows and the others go on.
"""

from __future__ import annotations

import time
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


def _study_error(name: str, message: str) -> ScoreRow:
    return ScoreRow(volume=name, nodule="", point_id="", r=float("nan"), a=float("nan"), s=float("nan"),
                    error=message)


@dataclass
class BatchScoring:
    """Scores the studies one by one; ``step`` never blocks (call it from a timer or a loop).

    Each study is one request to the engine: ``step`` sends it, later calls collect its
    answer and send the next. Cancelling lets the study in flight finish and sends no
    other. A study that fails (no points, engine died, ...) gets one error row.

    Args:
        logic: the ``SceneLogic`` that scores one volume.
        studies: from ``find_studies``.
        adapter: adapter name (default: the active one).
        tta: test-time augmentation.
        progress: called with (studies done, studies in all, volume name) after each study.
    """

    logic: object
    studies: list[Study]
    adapter: str | None = None
    tta: bool = True
    progress: Callable[[int, int, str], None] | None = None
    rows: list[ScoreRow] = field(default_factory=list)
    done: int = 0
    cancelled: bool = False
    table_node: object = None
    _job: object = None

    @property
    def finished(self) -> bool:
        return self._job is None and (self.cancelled or self.done >= len(self.studies))

    def cancel(self) -> None:
        """Send no further study; the one in flight still lands in the table."""
        self.cancelled = True

    def step(self) -> bool:
        """Advance without waiting; returns False when there is nothing left to do."""
        if self._job is None:
            if self.finished:
                return False
            self._begin(self.studies[self.done])
        if self._job is not None:
            name = self._job.batch.volume_name
            try:
                rows = self._job.poll()
            except MedLoRAError as exc:
                rows = [_study_error(name, str(exc))]
            if rows is None:
                return True
            self._job = None
            self._study_done(name, rows)
        return not self.finished

    def _begin(self, study: Study) -> None:
        name = study.volume.GetName()
        if study.markups is None:
            self._study_done(name, [_study_error(name, study.found_by)])
            return
        try:
            self._job = self.logic.begin_score(study.volume, study.markups, adapter=self.adapter, tta=self.tta,
                                               write_results_table=False)
        except MedLoRAError as exc:
            self._study_done(name, [_study_error(name, str(exc))])

    def _study_done(self, name: str, rows: list[ScoreRow]) -> None:
        self.rows.extend(rows)
        self.done += 1
        self.table_node = write_table(self.logic.scene, self.rows, self.table_node, name="MedLoRA batch results")
        if self.progress is not None:
            self.progress(self.done, len(self.studies), name)

    def run(self, poll_s: float = 0.02) -> list[ScoreRow]:
        """Score every study, waiting (scripts and tests)."""
        while self.step():
            time.sleep(poll_s)
        return self.rows
