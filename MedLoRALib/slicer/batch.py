"""Batch scoring: every marked nodule in every loaded study, into one table (a ``jobs.Job``).

Which markups belong to which volume: the volume's ``MedLoRA.markups`` node reference,
else the only point list or ROI in the same subject-hierarchy study, else the caller
is asked (the widget shows a dialog; scripts pass a function or get the volume
skipped with a reason). The chooser returns ``None`` when the user cancels: that volume is
then skipped, and ``BatchScoring`` scores nothing for it. Studies are scored one after
another so the user can cancel between them; a study that fails is reported in its rows
and the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..crops import Study
from ..errors import MedLoRAError
from .mrml import markups_for_volume
from .results import ScoreRow, write_table

#: (volume node, candidate markups nodes) -> the chosen one, or ``None`` (cancelled: skip the volume).
AskMarkups = Callable[[object, list], object]


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
            studies.append(Study(volume.GetName(), volume, referenced, "reference"))
            continue
        in_study = _study_markups(scene, volume)
        if len(in_study) == 1:
            studies.append(Study(volume.GetName(), volume, in_study[0], "subject hierarchy"))
            continue
        candidates = in_study or _markups_nodes(scene)
        if ask is not None and candidates:
            chosen = ask(volume, candidates)
            if chosen is not None and all(chosen is not c for c in candidates):
                raise MedLoRAError(f"the chooser returned '{chosen.GetName()}', which is not one of the candidates.")
            studies.append(Study(volume.GetName(), volume, chosen, "asked") if chosen is not None else
                           Study(volume.GetName(), volume, None, "skipped: no point list chosen for this volume"))
        else:
            studies.append(Study(volume.GetName(), volume, None,
                                 "no markups linked to this volume (set them in the MedLoRA module)"))
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
        session: the ``ScoringSession`` that scores one volume.
        studies: from ``find_studies``.
        adapter: adapter name (default: the active one), or a list of names: an ensemble.
        tta: test-time augmentation: True (each adapter's own set, as its manifest records), False, a count
            or a set name; each row records the set used.
        on_study: called with (studies done, studies in all, volume name) after each study.
    """

    session: object
    studies: list[Study]
    adapter: str | list[str] | None = None
    tta: bool | int | str = True
    on_study: Callable[[int, int, str], None] | None = None
    rows: list[ScoreRow] = field(default_factory=list)
    done: int = 0
    cancelled: bool = False
    table_node: object = None
    _job: object = None

    @property
    def finished(self) -> bool:
        return self._job is None and (self.cancelled or self.done >= len(self.studies))

    @property
    def progress(self) -> float:
        return self.done / max(1, len(self.studies))

    @property
    def status(self) -> str:
        return f"{self.done}/{len(self.studies)} studies scored" + (" (cancelled)" if self.cancelled else "")

    @property
    def results_table(self):
        return self.table_node

    def cancel(self) -> None:
        """Send no further study; the one in flight still lands in the table."""
        self.cancelled = True

    def poll(self) -> bool:
        """Advance without waiting; True once finished."""
        if self._job is None:
            if self.finished:
                return True
            self._begin(self.studies[self.done])
        if self._job is not None:
            name = self._job.batch.volume_name
            try:
                done = self._job.poll()
            except MedLoRAError as exc:
                done, self._job.rows = True, [_study_error(name, str(exc))]
            if not done:
                return False
            rows, self._job = self._job.rows, None
            self._study_done(name, rows)
        return self.finished

    def _begin(self, study: Study) -> None:
        name = study.volume.GetName()
        if study.markups is None:
            self._study_done(name, [_study_error(name, study.found_by)])
            return
        try:
            self._job = self.session.begin_score(study.volume, study.markups, adapter=self.adapter, tta=self.tta,
                                               write_results_table=False)
        except MedLoRAError as exc:
            self._study_done(name, [_study_error(name, str(exc))])

    def _study_done(self, name: str, rows: list[ScoreRow]) -> None:
        self.rows.extend(rows)
        self.done += 1
        self.table_node = write_table(self.session.scene, self.rows, self.table_node, name="MedLoRA batch results")
        if self.on_study is not None:
            self.on_study(self.done, len(self.studies), name)

    def run(self, poll_s: float = 0.02) -> list[ScoreRow]:
        """Score every study, waiting (scripts and tests)."""
        while not self.poll():
            time.sleep(poll_s)
        return self.rows
