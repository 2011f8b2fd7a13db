"""What the MedLoRA module's widget calls, as one object: Slicer's ``MedLoRALogic`` minus the parameter node.

``MedLoRA.py`` derives ``MedLoRALogic`` from this and Slicer's
``ScriptedLoadableModuleLogic``, so the widget stays a thin layer of Qt handlers and
everything it does can be run and tested headless with ``slicer-core``. Method names
follow Slicer's camelCase, as the widget's do. The engine client, process runner and
adapter store are constructor arguments with working defaults.
"""

from __future__ import annotations

import os

from ..adapters.store import AdapterStore, default_store_root
from ..errors import MedLoRAError
from . import crops, dependencies, mrml
from .batch import BatchScoring, find_studies
from .engine_client import EngineConfig
from .logic import SceneLogic
from .training import TrainingJob, start_training


class ModuleLogic:
    """The module's operations on one scene.

    Args:
        scene: the MRML scene.
        engine: the engine client (default: ``medlora serve`` with this library on its path).
        runner: runs training processes (default: real child processes).
        store: the adapter store (default: the user's).
        workDir: where training sets and runs go (default: ``training`` in MedLoRA's data folder).
        libraryRoot: folder holding ``MedLoRALib``, put on the engine's and trainer's ``PYTHONPATH``
            (developer mode: Slicer's Python does not have it installed).
    """

    def __init__(self, scene, engine=None, runner=None, store=None, workDir=None, libraryRoot=None):
        pythonPath = os.pathsep.join(filter(None, (libraryRoot, os.environ.get("PYTHONPATH"))))
        env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
        if pythonPath:
            env["PYTHONPATH"] = pythonPath
        self.sceneLogic = SceneLogic(scene, engine=engine, runner=runner,
                                     store=store if store is not None else AdapterStore(),
                                     engine_config=EngineConfig(env=env))
        self.dataDir = str(default_store_root().parent)
        self.workDir = workDir or os.path.join(self.dataDir, "training")

    # engine
    def enginePython(self):
        return self.sceneLogic.engine.config.python or ""

    def setEnginePython(self, path):
        self.sceneLogic.engine.config.python = path or None

    def restartEngine(self, device="auto"):
        engine = self.sceneLogic.engine
        engine.close()
        engine.config.extra_args = [] if device in (None, "", "auto") else ["--device", device]

    def ensureDependencies(self, confirm):
        return dependencies.ensure(self.sceneLogic.engine.config.python, confirm)

    # adapters
    def adapterNames(self):
        store = self.sceneLogic.store
        return [a.name for a in store.list()] if store is not None else list(self.sceneLogic.adapters)

    def adapterInfo(self, name):
        """One paragraph on an adapter: what it reads, what it says, how well it did in validation."""
        manifest = self.sceneLogic.store.info(name)
        spec = manifest.spec
        negative, positive = manifest.label_names
        auc = manifest.metrics.get("auc")
        return (f"{manifest.name}: backbone {manifest.backbone}"
                + (" (RANDOM INIT: scores mean nothing)" if manifest.random_init else "")
                + f", {manifest.mode}; {spec.views} patches of {spec.fov_mm:g} mm at {spec.pixels} px; "
                + f"{positive} at probability ≥ {manifest.threshold:.2f}, else {negative}"
                + (f"; validation AUC {auc:.3f} on {manifest.metrics.get('n', '?')} nodules" if auc is not None else "")
                + f"; created {manifest.created[:10]}")

    def _attach(self, name):
        """The store's adapter by name, registered for the engine (loaded there when first needed)."""
        if not name:
            raise MedLoRAError("choose an adapter first (or import one in the Adapters section).")
        if name not in self.sceneLogic.adapters:
            self.sceneLogic.register_adapter(str(self.sceneLogic.store.path(name)), name=name)
        return name

    def importAdapter(self, path):
        """Copy an adapter (folder, its manifest.json, or .zip) into the store; returns its name."""
        if os.path.basename(str(path)) == "manifest.json":
            path = os.path.dirname(str(path))
        return self.sceneLogic.store.import_(path)

    def exportAdapter(self, name, path):
        return self.sceneLogic.store.export(name, path)

    def deleteAdapter(self, name):
        self.sceneLogic.detach_adapter(name)
        self.sceneLogic.store.delete(name)

    def _spec(self, adapter):
        if not adapter:
            raise MedLoRAError("choose an adapter first: crops are cut the way the adapter reads them.")
        return self.sceneLogic.store.info(adapter).spec

    # scoring, crops, training
    def beginScore(self, volume, markups, adapter, table=None, tta=True, device="auto"):
        """Score the points of one volume; the pair is remembered for batch scoring and training."""
        if volume is not None and markups is not None and mrml.markups_for_volume(volume) is None:
            mrml.link_markups(volume, markups)
        self._configureDevice(device)
        return self.sceneLogic.begin_score(volume, markups, self._attach(adapter), table, tta)

    def beginScoreAll(self, adapter, ask=None, device="auto", tta=True):
        self._configureDevice(device)
        return BatchScoring(self.sceneLogic, find_studies(self.sceneLogic.scene, ask), adapter=self._attach(adapter),
                            tta=tta)

    def _configureDevice(self, device):
        wanted = [] if device in (None, "", "auto") else ["--device", device]
        if wanted != self.sceneLogic.engine.config.extra_args:
            self.restartEngine(device)

    def activePoint(self, volume, markups):
        """The markups' active control point (else its first), as a ScenePoint."""
        if volume is None or markups is None:
            raise MedLoRAError("select a volume and a point list (or ROI) first.")
        points = mrml.markups_to_points(markups, volume.GetName())
        if not points:
            raise MedLoRAError(f"'{markups.GetName()}' has no placed points: click on a nodule first.")
        display = markups.GetDisplayNode()
        isPointList = display is not None and markups.IsA("vtkMRMLMarkupsFiducialNode")
        active = display.GetActiveControlPoint() if isPointList else -1
        return next((p for p in points if p.index == active), points[0])

    def cropPreview(self, volume, markups, adapter, path=None):
        """The active nodule's views as a PNG (what the adapter sees); returns its path."""
        path = path or os.path.join(self.dataDir, "thumbnail.png")
        return crops.save_thumbnail(volume, self.activePoint(volume, markups), self._spec(adapter), path)

    def showCube(self, volume, markups, adapter):
        """The active nodule's cube as a new volume node, placed exactly where it was cut."""
        return self.sceneLogic.cube_to_volume(volume, self.activePoint(volume, markups), self._spec(adapter))

    def scenePairs(self, volume=None, markups=None):
        """(volume, markups) of every loaded study, with the selected pair if it is not linked."""
        pairs = [(s.volume, s.markups) for s in find_studies(self.sceneLogic.scene) if s.markups is not None]
        if volume is not None and markups is not None and all(v is not volume for v, _ in pairs):
            pairs.append((volume, markups))
        return pairs

    def exportCrops(self, folder, adapter, volume=None, markups=None):
        """Every nodule's patch of every loaded study, in the ``medlora crop`` format."""
        return crops.export_crops(self.scenePairs(volume, markups), folder, crops.crop_job_for(self._spec(adapter)))

    def startTraining(self, config, volume=None, markups=None, resume=False):
        """Train from the labelled points of every loaded study, with the engine's Python and environment."""
        engine_config = self.sceneLogic.engine.config
        config.python = config.python or engine_config.python
        config.env = {**engine_config.env, **config.env}
        work = os.path.join(self.workDir, config.name)
        return start_training(self.sceneLogic.scene, self.sceneLogic.runner, self.scenePairs(volume, markups), work,
                              config, store=self.sceneLogic.store, resume=resume)

    # jobs polled by the widget's timer: a ScoreJob, a BatchScoring or a TrainingJob
    def pollJob(self, job):
        """Advance a job without blocking; True when it has finished."""
        if isinstance(job, BatchScoring):
            return not job.step()
        if isinstance(job, TrainingJob):
            job.poll()
            return not job.running
        return job.poll() is not None

    def jobProgress(self, job, maximum):
        if isinstance(job, BatchScoring):
            return job.done
        if isinstance(job, TrainingJob):
            return int(job.state.fraction * maximum)
        return maximum if job.rows is not None else 0

    def jobStatus(self, job):
        if isinstance(job, BatchScoring):
            status = f"{job.done}/{len(job.studies)} studies scored" + (" (cancelled)" if job.cancelled else "")
        elif isinstance(job, TrainingJob):
            status = job.state.status
        elif job.cancelled:
            status = "scoring cancelled"
        elif job.rows is not None:
            status = f"{len(job.rows)} nodules scored"
        else:
            status = "starting the scoring engine…" if job.stage == "engine" else "scoring…"
        reason, self.sceneLogic.engine.restart_reason = self.sceneLogic.engine.restart_reason, None
        return status + (f" — {reason.splitlines()[0]}" if reason else "")

    def jobResultsTable(self, job):
        """The results table a finished scoring job wrote (None for training)."""
        return None if isinstance(job, TrainingJob) else job.table_node

    def cancelJob(self, job):
        job.cancel()

    def close(self):
        self.sceneLogic.close()
