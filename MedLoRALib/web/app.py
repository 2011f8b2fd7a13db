"""The web app: trame state and page actions over one MRML scene and the Slicer module's logic.

Every action goes to the same code the Slicer module uses: ``ModuleLogic`` scores (warm
``medlora serve`` engine, restarted on the next request if it died), colours the points and
cuts the thumbnail; ``Studies`` opens CTs and imports points; the Train tab is ``TrainTab``
(``training_view.py``). A timer (``tick``) advances the running job and refreshes the point list
and the views' geometry in the page; what the page shows of results, and the status line after
a failed job, come from ``results_view.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..adapters import AdapterManifest
from ..adapters.store import AdapterStore
from ..errors import MedLoRAError
from ..slicer import crops, mrml
from ..slicer.batch import BatchScoring
from ..slicer.module_logic import ModuleLogic
from ..slicer.results import export_csv
from ..slicer.scoring import ScoreJob
from ..slicer.training import TrainingJob
from . import page, views
from .guard import guarded
from .paths import DataRoot, WebInputError
from .results_view import data_link, failure_status, row_dict
from .studies import Studies
from .training_view import TrainTab

TICK_S = 0.1


@dataclass
class WebConfig:
    """How ``medlora web`` runs (the command line fills it)."""

    data_root: DataRoot
    store: Path | None = None
    work_dir: Path | None = None
    device: str = "auto"
    engine_python: str | None = None
    adapters: tuple[Path, ...] = ()  # adapter folders or .zip offered beside the store's


class MedLoRAWeb:
    """The trame application: builds the page and answers its actions."""

    def __init__(self, server, config: WebConfig) -> None:
        import slicer
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.server, self.state, self.config = server, server.state, config
        views.prefer_egl_without_display()  # before the first render window: no X probe and its warning
        self.slicer_app = SlicerApp()
        slicer.mrmlScene = self.slicer_app.scene  # slicer.util helpers work on it
        register_rca_factories(self.slicer_app.view_manager, server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, server)
        self.layout_manager.register_layout("medlora", views.layout())
        self.layout_manager.set_layout("medlora")
        store = AdapterStore(config.store) if config.store else AdapterStore()
        self.upload_dir = Path(tempfile.mkdtemp(prefix="medlora-web-uploads-"))
        self.logic = ModuleLogic(self.slicer_app.scene, store=store,
                                 workDir=str(config.work_dir) if config.work_dir else None)
        self.logic.setEnginePython(config.engine_python)
        self.extra_adapters = [self.logic.session.register_adapter(str(path)) for path in config.adapters]
        self.studies = Studies(self.slicer_app.scene)
        self.train = TrainTab(self.state, self.logic)
        self._rows: list = []
        self._init_state()
        page.build(self)
        server.controller.on_server_ready.add(self._start_ticking)

    # --- state ------------------------------------------------------------------------
    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "MedLoRA"
        s.error, s.status, s.busy = "", "", False
        s.open_path, s.points_path, s.centre_text = "", "", ""
        s.studies, s.study = [], None
        s.points, s.placing = [], True
        s.adapters, s.adapter = [], None
        s.threshold_note = ""
        s.results, s.selected_row = [], -1
        s.thumbnail = ""
        s.window = "lung"
        s.view_geometry = "{}"
        s.tab = "score"
        self.train.init_state()
        s.labelled = ""
        s.batch_folder, s.batch_results, s.batch_progress, s.batch_status, s.batch_csv = "", [], 0, "", ""
        s.max_upload_bytes = self.config.data_root.max_upload_bytes
        s.data_root = str(self.config.data_root.root)
        self.refresh_adapters()

    def _start_ticking(self, **_) -> None:
        asyncio.get_event_loop().create_task(self._ticker())

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            with self.state:
                self.tick()

    # --- the timer --------------------------------------------------------------------
    @guarded
    def tick(self) -> None:
        logic = self.logic
        if logic.busy():
            job = logic.job
            try:
                finished = logic.tick()
            except MedLoRAError as exc:  # the error box gets the message (guard); the status line what to do
                self._job_failed(job, exc)
                raise
            if job is not None:  # else only processes wind down: the last status stays
                self.state.status = logic.jobStatus(finished) if finished else logic.jobStatus()
            if finished is not None:
                self._job_finished(finished)
        self.state.busy = logic.job is not None
        self.train.follow(logic.job)
        if isinstance(logic.job, BatchScoring):
            self._show_batch(logic.job)
        self._refresh_points()
        geometry = json.dumps(views.geometry(self.slicer_app))
        if geometry != self.state.view_geometry:
            self.state.view_geometry = geometry

    def _job_finished(self, job) -> None:
        if isinstance(job, TrainingJob):
            self.train.finished(job)
            self.refresh_adapters()
            if job.stored_adapter:
                self.state.adapter = job.stored_adapter
        if isinstance(job, BatchScoring):
            self._show_batch(job)
            self._batch_csv(job.rows)
        if isinstance(job, ScoreJob) and job.rows is not None:
            self._rows = list(job.rows)
            self.state.results = [row_dict(i, row) for i, row in enumerate(self._rows)]
            self.state.status = job.status

    def _job_failed(self, job, exc: MedLoRAError) -> None:
        status = failure_status(job, exc, engine_running=self.logic.session.engine.is_running())
        self.state.status = status
        if isinstance(job, TrainingJob):
            self.train.failed(status)
        if isinstance(job, BatchScoring):
            self.state.batch_status = status

    def _refresh_points(self) -> None:
        """The point list and the label counts, when they changed (removing or moving a control point
        does not change the node's MTime, so the lists themselves are compared; a few points each)."""
        if self.studies.current is None:
            return
        points = [{"id": p.point_id, "name": p.name, "label": {0: "benign", 1: "malignant"}.get(p.training_label, ""),
                   "ras": [round(v, 2) for v in p.position_ras]}
                  for p in mrml.markups_to_points(self.studies.get().markups, self.studies.current)]
        if points != self.state.points:
            self.state.points = points
        labelled = [p.training_label for study in self.studies.by_name.values()
                    for p in mrml.markups_to_points(study.markups, study.name) if p.training_label is not None]
        text = (f"{labelled.count(0)} benign, {labelled.count(1)} malignant points labelled in "
                f"{len(self.studies.by_name)} open studies")
        if text != self.state.labelled:
            self.state.labelled = text

    # --- studies ----------------------------------------------------------------------
    @guarded
    def open_path(self, text: str) -> None:
        """Open the CT the page names (values come with the click: the page's state may lag behind)."""
        path = self.config.data_root.resolve(text)
        self._show(self.studies.open(path))

    @guarded
    def upload(self, files) -> None:
        files = files if isinstance(files, list) else [files]
        if not files:
            raise WebInputError("no file was uploaded.")
        total = sum(len(f.get("content") or b"") for f in files)
        names = [self.config.data_root.check_upload(f.get("name", ""), total) for f in files]
        folder = Path(tempfile.mkdtemp(dir=self.upload_dir))
        for name, f in zip(names, files):
            content = f.get("content") or b""
            (folder / name).write_bytes(content if isinstance(content, bytes) else bytes(content))
        self._show(self.studies.open(folder if len(names) > 1 else folder / names[0], name=names[0].split(".")[0]))

    def _show(self, study) -> None:
        views.show_volume(self.slicer_app, study.volume)
        self.state.studies = list(self.studies.by_name)
        self.state.study = study.name
        self.state.results, self._rows, self.state.thumbnail = [], [], ""
        self.set_placing(True)
        self.state.error = ""
        self.state.status = f"opened {study.name}: {study.image.geometry.size[0]}×{study.image.geometry.size[1]}×" \
                            f"{study.image.geometry.size[2]} voxels"

    @guarded
    def choose_study(self, name: str) -> None:
        study = self.studies.get(name)
        self.studies.current = name
        views.show_volume(self.slicer_app, study.volume)
        self.set_placing(self.state.placing)

    @guarded
    def set_window(self, preset: str) -> None:
        views.set_window(self.studies.get().volume, preset)
        self.state.window = preset

    @guarded
    def centre_on(self, text: str) -> None:
        try:
            point = [float(v) for v in str(text).replace(",", " ").split()]
        except ValueError:
            point = []
        if len(point) != 3 or not all(math.isfinite(v) for v in point):
            raise WebInputError(f"'{text}': give the point as three numbers R A S in mm (world RAS).")
        views.centre_on(self.slicer_app, point)

    # --- points -----------------------------------------------------------------------
    @guarded
    def set_placing(self, placing: bool) -> None:
        """Clicks in a slice view place points (Slicer's place mode), or move and pick them."""
        self.state.placing = bool(placing)
        if self.studies.current is None:
            return
        markups_logic = self.slicer_app.markups_logic
        if placing:
            markups_logic.place_node(self.studies.get().markups, persistent=True)
        else:
            markups_logic.disable_place_mode()

    @guarded
    def import_points(self, text: str) -> None:
        path = self.config.data_root.resolve(text)
        count = self.studies.import_points(path)
        self.state.status = f"imported {count} point(s) from {path.name}"
        self.state.error = ""

    @guarded
    def delete_point(self, point_id: str) -> None:
        self.studies.delete_point(point_id)

    @guarded
    def label_point(self, point_id: str, label: int | None) -> None:
        mrml.set_training_label(self.studies.get().markups, point_id, label)

    # --- adapters and scoring ----------------------------------------------------------
    @guarded
    def refresh_adapters(self) -> None:
        names = self.logic.adapterNames() + [n for n in self.extra_adapters if n not in self.logic.adapterNames()]
        self.state.adapters = names
        if self.state.adapter not in names:
            self.state.adapter = names[0] if names else None

    @guarded
    def score(self, adapter: str | None) -> None:
        study = self.studies.get()
        self.logic.beginScore(study.volume, study.markups, adapter, device=self.config.device)
        self.state.busy, self.state.error, self.state.results, self._rows = True, "", [], []
        self.state.status = self.logic.jobStatus()

    @guarded
    def cancel(self) -> None:
        self.logic.cancelJob()
        self.state.status = "cancelled"

    @guarded
    def select_row(self, index: int) -> None:
        index = int(index)
        if not 0 <= index < len(self._rows):
            return
        row = self._rows[index]
        self.state.selected_row = index
        if row.probability is None or any(math.isnan(v) for v in (row.r, row.a, row.s)):
            self.state.thumbnail = ""
            return
        views.centre_on(self.slicer_app, (row.r, row.a, row.s))
        study = self.studies.get(row.volume)
        point = next((p for p in mrml.markups_to_points(study.markups, study.name) if p.point_id == row.point_id),
                     None)
        if point is None:
            raise MedLoRAError(f"'{row.nodule}' was deleted after scoring: score again.")
        path = crops.save_thumbnail(study.volume, point, self._spec(row.adapter), self.upload_dir / "thumbnail.png")
        self.state.thumbnail = data_link(path, "image/png")

    def _spec(self, adapter: str):
        """The patch geometry of an adapter, registered by path (``--adapter``) or in the store."""
        session = self.logic.session
        if adapter in session.adapters:
            return AdapterManifest.from_dict(session.adapters[adapter], f"adapter {adapter}").spec
        return session.store.info(adapter).spec

    # --- batch ------------------------------------------------------------------------
    @guarded
    def start_batch(self, text: str, adapter: str | None) -> None:
        """Open every study of a folder under the data root (with its annotations) and score them all."""
        folder = self.config.data_root.resolve(text)
        opened = self.studies.open_folder(folder)
        self.studies.current = opened[-1].name
        self._show(opened[-1])
        self.state.tab = "batch"
        self.logic.beginScoreAll(adapter, device=self.config.device,
                                 volumes=[study.volume for study in opened])
        s = self.state
        s.busy, s.error, s.batch_results, s.batch_csv, s.batch_progress = True, "", [], "", 0

    @guarded
    def cancel_batch(self) -> None:
        if isinstance(self.logic.job, BatchScoring):
            job = self.logic.job
            self.logic.cancelJob()
            self._show_batch(job)

    def _show_batch(self, job: BatchScoring) -> None:
        s = self.state
        s.batch_progress = int(round(100 * job.progress))
        s.batch_status = job.status
        if len(job.rows) != len(s.batch_results):
            s.batch_results = [{**row_dict(i, row), "volume": row.volume} for i, row in enumerate(job.rows)]

    def _batch_csv(self, rows) -> None:
        self.state.batch_csv = data_link(export_csv(rows, self.upload_dir / "batch-results.csv"), "text/csv")

    def close(self) -> None:
        self.logic.close()


def create_app(config: WebConfig, server=None) -> MedLoRAWeb:
    from trame.app import get_server

    server = server or get_server("medlora-web", client_type="vue3")
    return MedLoRAWeb(server, config)

