"""What the MedLoRA widget asks for, as one object: the module's logic without Qt.

``MedLoRALogic`` in ``MedLoRA.py`` holds one ``ModuleLogic`` (composition: Slicer's
``ScriptedLoadableModuleLogic.__init__`` calls ``super().__init__()`` without arguments, so
a second base class cannot take the scene). The widget stays a thin layer of Qt handlers;
everything here runs headless on a real MRML scene with ``slicer-core``. Method names follow
Slicer's camelCase, as the widget's do.

It routes each user action to the piece that does it — the scoring session
(``scoring.py``), batch scoring (``batch.py``), the training job (``training.py``), crops
(``crops.py``), the DICOM SR export (``sr_export.py``) — and keeps the one job in progress, which the widget advances with
``tick`` from a timer, whatever kind of job it is (``jobs.Job``). Closing the scene cancels
that job, lets the engine go and drops every reference to the scene's nodes
(``onSceneStartClose``, observed on the scene here).
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from ..adapters.store import AdapterStore, default_store_root
from ..errors import MedLoRAError
from . import crops, dependencies, mrml, sr_export
from .batch import BatchScoring, find_studies
from .engine_client import EngineConfig
from .jobs import Job
from .mrml import ScenePoint
from .process import ProcessRunner
from .scoring import ScoringSession
from .training import TrainingConfig, start_training

#: (volume node, candidate markups nodes) -> the chosen one, or ``None`` when the user cancelled.
MarkupsChooser = Callable[[object, Sequence], object]
AUTO_DEVICE = ("", "auto", None)


class ModuleLogic:
    """The module's operations on one scene.

    Args:
        scene: the MRML scene.
        engine: the engine client (default: ``medlora serve`` with this library on its path).
        runner: runs the engine and training processes (inside Slicer: ``QtProcessRunner``;
            default: ``SubprocessRunner``).
        store: the adapter store (default: the user's).
        workDir: where training sets and runs go (default: ``training`` in MedLoRA's data folder).
        libraryRoot: folder holding ``MedLoRALib``, put on the engine's and trainer's ``PYTHONPATH``
            (developer mode: Slicer's Python does not have it installed).
    """

    def __init__(self, scene, engine=None, runner: ProcessRunner | None = None, store=None, workDir=None,
                 libraryRoot=None):
        pythonPath = os.pathsep.join(filter(None, (libraryRoot, os.environ.get("PYTHONPATH"))))
        env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
        if pythonPath:
            env["PYTHONPATH"] = pythonPath
        self.scene = scene
        self.session = ScoringSession(scene, engine=engine, runner=runner,
                                      store=store if store is not None else AdapterStore(),
                                      engine_config=EngineConfig(env=env))
        self.dataDir = str(default_store_root().parent)
        self.workDir = workDir or os.path.join(self.dataDir, "training")
        self.job: Job | None = None
        self.ending: list[Job] = []  # cancelled jobs still winding down (processes stopping)
        self._observations: list[tuple[object, int]] = []
        self._observe(scene, scene.StartCloseEvent, "onSceneStartClose")

    # --- observers and the scene's life -----------------------------------------------------
    def _observe(self, obj, event, method_name: str) -> None:
        """Observe ``obj`` without a reference cycle (the observer holds this logic weakly)."""
        this = weakref.ref(self)

        def callback(caller, event_name):
            logic = this()
            if logic is not None:
                getattr(logic, method_name)()

        self._observations.append((obj, obj.AddObserver(event, callback)))

    def observerCount(self) -> int:
        return len(self._observations)

    def onSceneStartClose(self) -> None:
        """The scene is closing: cancel the job, let the engine go, forget the scene's nodes (never waits)."""
        if self.job is not None:
            self.cancelJob()
        self.session.restart_engine()  # shut down in the background; the next scene starts a new one

    def close(self) -> None:
        """The module is unloaded: remove the observers, end every process and wait for them."""
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations = []
        self.cancelJob()
        for job in self.ending:
            while not _poll_quietly(job):
                time.sleep(0.05)
        self.ending = []
        self.session.close()

    # --- jobs -------------------------------------------------------------------------------
    def _startJob(self, job: Job) -> Job:
        if self.job is not None:
            raise MedLoRAError(f"MedLoRA is still working ({self.job.status}); wait, or press Cancel.")
        self.job = job
        return job

    def busy(self) -> bool:
        """A job runs, or processes are still ending: the widget keeps ticking."""
        return self.job is not None or bool(self.ending) or bool(self.session.reaper.handles)

    def tick(self) -> Job | None:
        """Advance the job and whatever is winding down (never waits); returns the job if it just finished."""
        self.ending = [job for job in self.ending if not _poll_quietly(job)]
        self.session.reaper.poll()
        job = self.job
        if job is None:
            return None
        try:
            done = job.poll()
        except MedLoRAError:
            self.job = None
            raise
        if done:
            self.job = None
            return job
        return None

    def cancelJob(self) -> None:
        """Ask the job to stop; it winds down in the background (``tick``)."""
        job, self.job = self.job, None
        if job is not None:
            job.cancel()
            if not job.finished:
                self.ending.append(job)

    def jobStatus(self, job: Job | None = None) -> str:
        job = job or self.job
        status = job.status if job is not None else ""
        reason, self.session.engine.restart_reason = self.session.engine.restart_reason, None
        return status + (f" — {reason.splitlines()[0]}" if reason else "")

    # --- engine -----------------------------------------------------------------------------
    def enginePython(self):
        return self.session.engine.config.python or ""

    def setEnginePython(self, path):
        self.session.engine.config.python = path or None

    def restartEngine(self, device="auto"):
        """Let the running engine shut down in the background; the next request starts a new one."""
        self.session.restart_engine([] if device in AUTO_DEVICE else ["--device", device])

    def _configureDevice(self, device):
        wanted = [] if device in AUTO_DEVICE else ["--device", device]
        if wanted != self.session.engine.config.extra_args:
            self.restartEngine(device)

    def ensureDependencies(self, confirm):
        return dependencies.ensure(self.session.engine.config.python, confirm)

    # --- adapters ---------------------------------------------------------------------------
    def adapterNames(self):
        return [a.name for a in self.session.store.list()]

    def adapterInfo(self, name):
        """One paragraph on an adapter: what it reads, what it says, how well it did in validation."""
        manifest = self.session.store.info(name)
        spec = manifest.spec
        negative, positive = manifest.label_names
        auc = manifest.metrics.get("auc")
        return (f"{manifest.name}: backbone {manifest.backbone}"
                + (" (RANDOM INIT: scores mean nothing)" if manifest.random_init else "")
                + f", {manifest.mode}; {spec.views} patches of {spec.fov_mm:g} mm at {spec.pixels} px; "
                + f"{positive} at probability ≥ {manifest.threshold:.2f}, else {negative}"
                + (f"; validation AUC {auc:.3f} on {manifest.metrics.get('n', '?')} nodules" if auc is not None else "")
                + f"; created {manifest.created[:10]}")

    def ensembleInfo(self, names):
        """One paragraph on a set of adapters scored together; ``AdapterError`` when they cannot be combined."""
        from ..ensemble import check_compatible

        manifests = {name: self.session.store.info(name) for name in names}
        check_compatible(manifests)
        thresholds = [m.threshold for m in manifests.values()]
        return (f"Ensemble of {len(manifests)} adapters ({', '.join(manifests)}) on {next(iter(manifests.values())).backbone}: "
                f"the table gets their mean probability (label at the mean threshold "
                f"{sum(thresholds) / len(thresholds):.2f}), the spread between them, whether they disagree "
                "across their thresholds, and each one's probability.")

    def _attach(self, name):
        """The store's adapter by name, registered for the engine (loaded there when first needed).

        A list of two or more names (an ensemble) registers each and returns the list.
        """
        if isinstance(name, (list, tuple)):
            names = [n for n in name if n]
            if len(names) > 1:
                return [self._attach(n) for n in names]
            name = names[0] if names else None
        if not name:
            raise MedLoRAError("choose an adapter first (or import one in the Adapters section).")
        if name not in self.session.adapters:
            self.session.register_adapter(str(self.session.store.path(name)), name=name)
        return name

    def importAdapter(self, path):
        """Copy an adapter (folder, its manifest.json, or .zip) into the store; returns its name."""
        if os.path.basename(str(path)) == "manifest.json":
            path = os.path.dirname(str(path))
        return self.session.store.import_(path)

    def exportAdapter(self, name, path, overwrite=True):
        """Export to ``path``. The save dialog has already asked before replacing a file, so an
        earlier export is replaced by default; anything that is not a MedLoRA adapter never is."""
        return self.session.store.export(name, path, overwrite=overwrite)

    def deleteAdapter(self, name):
        """Unload it from the engine (a message, not waited for) and delete it from the store."""
        self.session.detach_adapter(name)
        self.session.store.delete(name)

    def _spec(self, adapter):
        if not adapter:
            raise MedLoRAError("choose an adapter first: crops are cut the way the adapter reads them.")
        return self.session.store.info(adapter).spec

    # --- scoring ----------------------------------------------------------------------------
    def beginScore(self, volume, markups, adapter, table=None, tta=True, device="auto"):
        """Score the points of one volume; the pair is remembered for batch scoring and training.

        ``tta=True``: the adapter's own test-time augmentation set (its manifest's ``tta``); the rows say which.
        """
        if volume is None or markups is None:
            raise MedLoRAError("select a volume and a point list (or ROI) first.")
        if mrml.markups_for_volume(volume) is None:
            mrml.link_markups(volume, markups)
        self._configureDevice(device)
        return self._startJob(self.session.begin_score(volume, markups, self._attach(adapter), table, tta))

    def beginScoreAll(self, adapter, choose: MarkupsChooser | None = None, device="auto", tta=True, volumes=None):
        """Score every loaded study; ``choose`` picks the markups of an unlinked volume (``None``: skip it).

        ``volumes``: only the studies of these volume nodes (the web app's folder batch).
        """
        self._configureDevice(device)
        studies = find_studies(self.scene, choose)
        if volumes is not None:
            studies = [study for study in studies if any(study.volume is v for v in volumes)]
        return self._startJob(BatchScoring(self.session, studies, adapter=self._attach(adapter), tta=tta))

    def beginExplanation(self, volume, point, adapter, method="gradxinput", opacity=0.5):
        """Show where the model looked for one point: a saliency overlay on the CT (a job)."""
        if volume is None or point is None:
            raise MedLoRAError("select a volume and a point first.")
        return self._startJob(self.session.begin_explanation(volume, point, method, self._attach(adapter), opacity))

    # --- the point a button acts on -----------------------------------------------------------
    def selectedPoint(self, volume, markups, table=None, row=None, pointIndex=None) -> ScenePoint:
        """The point the user chose: the results-table row selected, else the point selector's index.

        Never the markups' active control point: it is reset to -1 by the time a button in the
        module panel is clicked.
        """
        if volume is None or markups is None:
            raise MedLoRAError("select a volume and a point list (or ROI) first.")
        points = mrml.markups_to_points(markups, volume.GetName())
        if not points:
            raise MedLoRAError(f"'{markups.GetName()}' has no placed points: click on a nodule first.")
        if table is not None and row is not None and row >= 0:
            volumeName, pointId = rowPoint(table, row)  # point IDs are unique per point list only
            found = next((p for p in points if p.point_id == pointId), None) if volumeName == volume.GetName() else None
            if found is None:
                raise MedLoRAError(f"row {row + 1} of '{table.GetName()}' is not a point of '{markups.GetName()}' "
                                   "(another study, or a warning row): select a row of this point list.")
            return found
        if pointIndex is not None and pointIndex >= 0:
            found = next((p for p in points if p.index == pointIndex), None)
            if found is None:
                raise MedLoRAError(f"point {pointIndex + 1} of '{markups.GetName()}' has no position: place it first.")
            return found
        if len(points) == 1:
            return points[0]
        raise MedLoRAError("select the nodule: click its row in the results table, or choose it in the point "
                           "selector.")

    def labelPoint(self, markups, point: ScenePoint, label: int) -> str:
        """Set a point's training label; returns what to tell the user."""
        mrml.set_training_label(markups, point.point_id, label)
        return f"{point.name} labelled {('benign', 'malignant')[label]}"

    # --- crops ------------------------------------------------------------------------------
    def cropPreview(self, volume, point: ScenePoint, adapter, path=None):
        """The nodule's views as a PNG (what the adapter sees); returns its path."""
        path = path or os.path.join(self.dataDir, "thumbnail.png")
        return crops.save_thumbnail(volume, point, self._spec(adapter), path)

    def showCube(self, volume, point: ScenePoint, adapter):
        """The nodule's cube as a new volume node, placed exactly where it was cut."""
        return crops.cube_to_volume(self.scene, volume, point, self._spec(adapter))

    def scenePairs(self, volume=None, markups=None):
        """(volume, markups) of every loaded study, with the selected pair if it is not linked."""
        pairs = [(s.volume, s.markups) for s in find_studies(self.scene) if s.markups is not None]
        if volume is not None and markups is not None and all(v is not volume for v, _ in pairs):
            pairs.append((volume, markups))
        return pairs

    def exportCrops(self, folder, adapter, volume=None, markups=None):
        """Every nodule's patch of every loaded study, in the ``medlora crop`` format, in a new folder
        ``medlora-crops`` (``-2``, ``-3``... when taken) inside ``folder``: the folder a dialog returns
        usually holds other files, and crops are never written beside them."""
        parent = Path(folder)
        out = next(parent / name for name in ("medlora-crops", *(f"medlora-crops-{n}" for n in range(2, 10000)))
                   if not (parent / name).exists())
        return crops.export_crops(self.scenePairs(volume, markups), out, crops.crop_job_for(self._spec(adapter)))

    # --- DICOM SR -----------------------------------------------------------------------------
    def beginExportSR(self, volume, table, path, overwrite=True, dicomDatabase=None):
        """Write one volume's scores in ``table`` as a DICOM SR (a job: a child process writes it).

        The save dialog has asked before replacing a file, so an earlier MedLoRA SR is replaced by
        default; any other file never is. ``dicomDatabase``: default ``slicer.dicomDatabase``.
        """
        if self.job is not None:
            raise MedLoRAError(f"MedLoRA is still working ({self.job.status}); wait, or press Cancel.")
        return self._startJob(sr_export.begin_sr_export(self.session, volume, table, path, overwrite=overwrite,
                                                        database=dicomDatabase))

    # --- training ---------------------------------------------------------------------------
    def startTraining(self, config: TrainingConfig, volume=None, markups=None, resume=False):
        """Train from the labelled points of every loaded study (returns at once; ``tick`` writes and trains)."""
        engineConfig = self.session.engine.config
        config.python = config.python or engineConfig.python
        config.env = {**engineConfig.env, **config.env}
        work = os.path.join(self.workDir, config.name)
        if self.job is not None:
            raise MedLoRAError(f"MedLoRA is still working ({self.job.status}); wait, or press Cancel.")
        return self._startJob(start_training(self.scene, self.session.runner, self.scenePairs(volume, markups), work,
                                             config, store=self.session.store, resume=resume))


def rowPoint(table, row: int) -> tuple[str, str]:
    """(volume name, control point ID) of a results-table row (ID '' for rows without a point)."""
    columns = [table.GetTable().GetColumnByName(name) for name in ("Volume", "Point ID")]
    if any(column is None for column in columns):
        raise MedLoRAError(f"table '{table.GetName()}' is not a MedLoRA results table (no Volume/Point ID column).")
    if not 0 <= row < table.GetNumberOfRows():
        raise MedLoRAError(f"row {row + 1} is not in '{table.GetName()}'.")
    return str(columns[0].GetValue(row)), str(columns[1].GetValue(row))


def _poll_quietly(job: Job) -> bool:
    """Advance a cancelled job; its errors no longer concern the user."""
    try:
        return job.poll()
    except MedLoRAError:
        return True
