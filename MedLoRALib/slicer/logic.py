"""The module's logic without Qt: what the MedLoRA widget calls, usable from scripts and tests.

``SceneLogic`` composes the pieces of this package: MRML conversion, patch cutting in
this process, scoring in the engine process, the results table, batch scoring and
training. Its engine client and process runner are constructor arguments, so tests
drive the real ``medlora serve``/``medlora train`` and the widget could hand in others.
Long operations come in two forms: ``begin_*`` returns a job the caller polls (a Qt
timer in Slicer, so the GUI never freezes) and the plain form waits for it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..adapters import AdapterManifest, read_manifest
from ..adapters.store import check_name
from ..errors import MedLoRAError
from ..image import CTImage
from ..nodule import centres_lps
from ..patches import PatchSpec, cube_geometry, extract_patches
from .engine_client import EngineClient, EngineConfig, EngineError, encode_patches
from .mrml import ScenePoint, add_volume_node, markups_to_points, volume_to_ct_image
from .process import ProcessRunner, SubprocessRunner
from .results import ScoreRow, colour_control_points, write_table


@dataclass
class PatchBatch:
    """Patches cut for the marked points of one volume; points outside it get an error."""

    volume_name: str
    points: list[ScenePoint]
    inside: np.ndarray
    patches: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)


def cut_patches(volume_node, markups_node, spec: PatchSpec) -> PatchBatch:
    """Cut the adapter's patches for every control point, in Slicer's process (no torch)."""
    image = volume_to_ct_image(volume_node)
    points = markups_to_points(markups_node, case_id=volume_node.GetName())
    if not points:
        raise MedLoRAError(f"'{markups_node.GetName()}' has no placed points: click on the nodules first.")
    centres = centres_lps([p.nodule for p in points])
    inside = image.geometry.contains_lps(centres)
    lo, hi = image.geometry.extent_lps
    errors = {i: (f"point at RAS ({p.position_ras[0]:.1f}, {p.position_ras[1]:.1f}, {p.position_ras[2]:.1f}) mm "
                  f"lies outside volume '{volume_node.GetName()}'")
              for i, p in enumerate(points) if not inside[i]}
    patches = (extract_patches(image, centres[inside], spec, require_inside=False) if inside.any()
               else np.zeros((0, *spec.shape), np.float32))
    return PatchBatch(volume_name=volume_node.GetName(), points=points, inside=inside, patches=patches,
                      errors=errors)


def rows_from_results(batch: PatchBatch, results: list[dict], adapter: str, version: str,
                      label_names: tuple[str, str] = ("benign", "malignant")) -> list[ScoreRow]:
    """Join the engine's results (one per inside point) with the points, in point order.

    The engine names the label with the adapter's ``label_names``; the row keeps that
    name and its class index (1 = the positive class, drawn red).
    """
    if len(results) != int(batch.inside.sum()):
        raise MedLoRAError(f"the scoring engine returned {len(results)} results for {int(batch.inside.sum())} "
                           "patches; restart the engine and score again.")
    scored = iter(results)
    rows = []
    for i, point in enumerate(batch.points):
        row = ScoreRow(volume=batch.volume_name, nodule=point.name, point_id=point.point_id,
                       r=point.position_ras[0], a=point.position_ras[1], s=point.position_ras[2],
                       adapter=adapter, adapter_version=version)
        if batch.inside[i]:
            result = next(scored)
            row.probability = float(result["probability"])
            name = result.get("label")
            row.label = None if name is None else (1 if name == label_names[1] else 0)
            row.label_name = "" if name is None else str(name)
            row.adapter = str(result.get("adapter", adapter))
            row.adapter_version = str(result.get("adapter_version", version))
            row.random_init = bool(result.get("random_init", False))
        else:
            row.error = batch.errors[i]
        rows.append(row)
    return rows


@dataclass
class ScoreJob:
    """A scoring request in flight; ``poll`` returns the rows once the engine has answered.

    When the engine first has to start or load adapters, that happens on a worker thread
    (``preparing``) and the request is sent when it is done, so nothing here blocks.
    """

    logic: SceneLogic
    batch: PatchBatch
    markups_node: object
    adapter: str
    version: str
    label_names: tuple[str, str]
    tta: bool = True
    table_node: object = None
    write_results_table: bool = True
    preparing: Future | None = None
    request_id: int | None = None
    rows: list[ScoreRow] | None = None
    cancelled: bool = False

    @property
    def stage(self) -> str:
        """What the job waits for: ``engine`` (starting, loading adapters), ``score`` or ``done``."""
        if self.rows is not None:
            return "done"
        return "engine" if self.preparing is not None else "score"

    def send(self) -> None:
        if len(self.batch.patches):
            self.request_id = self.logic.engine.submit("score", patches=encode_patches(self.batch.patches),
                                                       adapter=self.adapter, tta=self.tta)

    def poll(self) -> list[ScoreRow] | None:
        if self.rows is not None:
            return self.rows
        if self.preparing is not None:
            if not self.preparing.done():
                return None
            error, self.preparing = self.preparing.exception(), None
            if error is not None:
                raise error
            self.send()
        results = []
        if self.request_id is not None:
            answer = self.logic.engine.poll(self.request_id)
            if answer is None:
                return None
            results = answer["results"]
        self.rows = rows_from_results(self.batch, results, self.adapter, self.version, self.label_names)
        if self.write_results_table:
            self.table_node = write_table(self.logic.scene, self.rows, self.table_node)
        colour_control_points(self.markups_node, self.rows)
        return self.rows

    def cancel(self) -> None:
        """Give up on this request; a score being computed is stopped by ending the engine.

        An engine that is still starting is left to finish (the next request uses it).
        """
        if self.rows is not None:
            return
        self.cancelled = True
        if self.preparing is None and self.request_id is not None:
            self.logic.engine.kill()  # restarted on the next request
        self.rows = []

    def wait(self, timeout_s: float = 300.0) -> list[ScoreRow]:
        deadline = time.monotonic() + timeout_s
        while (rows := self.poll()) is None:
            if time.monotonic() > deadline:
                raise MedLoRAError(f"scoring did not finish within {timeout_s:.0f} s")
            time.sleep(0.02)
        return rows


class SceneLogic:
    """MedLoRA's logic on one MRML scene.

    Adapters are registered here (their manifest read from disk, torch-free) and loaded
    into the engine when it is next needed, together with any the engine lost by
    restarting — on a worker thread when scoring, so the caller never waits for it.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer).
        engine: the scoring engine client (default: ``medlora serve`` started on first use).
        runner: runs training processes (default: real child processes).
        store: an adapter store (``MedLoRALib.adapters.store.AdapterStore``) or ``None``.
        engine_config: how the default engine client starts the engine.
    """

    def __init__(self, scene, engine: EngineClient | None = None, runner: ProcessRunner | None = None,
                 store=None, engine_config: EngineConfig | None = None) -> None:
        self.scene = scene
        self.runner = runner or SubprocessRunner()
        self.engine = engine or EngineClient(engine_config, runner=self.runner)
        self.store = store
        self.adapters: dict[str, dict] = {}  # registered adapter name -> manifest
        self._sources: dict[str, tuple[str, str | None]] = {}  # name -> (path, backbone weights)
        self.active_adapter: str | None = None
        self._engine_generation = 0  # the engine start that _in_engine describes
        self._in_engine: set[str] = set()  # registered adapters loaded into that engine
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlora-engine")

    # --- adapters ----------------------------------------------------------------------
    def register_adapter(self, path: str, name: str | None = None, weights: str | None = None) -> str:
        """Make an adapter available under ``name``; the engine loads it when next needed."""
        manifest = read_manifest(path)
        name = check_name(name or manifest.name)
        self.adapters[name] = manifest.to_dict()
        self._sources[name] = (str(path), None if weights is None else str(weights))
        self._in_engine.discard(name)
        if self.active_adapter is None:
            self.active_adapter = name
        return name

    def attach_adapter(self, path: str, name: str | None = None, weights: str | None = None) -> str:
        """Register an adapter and load it into the engine now (kept there beside the others)."""
        name = self.register_adapter(path, name, weights)
        self.prepare_engine()
        return name

    def detach_adapter(self, name: str) -> None:
        """Unload an adapter from the engine and forget it here."""
        if name not in self.adapters:
            return
        if name in self._in_engine and self.engine.is_running():
            self.engine.detach_adapter(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._sources.pop(name, None)
        self._in_engine.discard(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def set_adapter(self, name: str) -> None:
        """Switch the active adapter: a message to the warm engine, no reload."""
        if name not in self.adapters:
            raise MedLoRAError(f"adapter '{name}' is not attached; attached: {', '.join(self.adapters) or 'none'}.")
        self.prepare_engine()
        self.engine.set_adapter(name)
        self.active_adapter = name

    def engine_ready(self) -> bool:
        """The engine runs and holds every registered adapter."""
        return (self.engine.is_running() and self._engine_generation == self.engine.starts
                and set(self._sources) <= self._in_engine)

    def prepare_engine(self) -> None:
        """Start the engine if needed and load the registered adapters it lacks (waits)."""
        self.engine.start()
        if self._engine_generation != self.engine.starts:  # a new engine holds none of them
            self._engine_generation, self._in_engine = self.engine.starts, set()
        missing = [name for name in self._sources if name not in self._in_engine]
        for name in missing:
            path, weights = self._sources[name]
            try:
                self.engine.attach_adapter(path, name=name, weights=weights)
            except EngineError:
                self._forget(name)
                raise
            self._in_engine.add(name)
        if missing and self.active_adapter in self._in_engine:
            self.engine.set_adapter(self.active_adapter)

    def _adapter(self, name: str | None) -> tuple[str, dict]:
        name = name or self.active_adapter
        if not name or name not in self.adapters:
            raise MedLoRAError("no adapter attached: choose an adapter (or import one) before scoring.")
        return name, self.adapters[name]

    # --- scoring -------------------------------------------------------------------------
    def begin_score(self, volume_node, markups_node, adapter: str | None = None, table_node=None,
                    tta: bool = True, write_results_table: bool = True) -> ScoreJob:
        """Cut patches here and send them to the engine; poll the returned job (never blocks)."""
        name, manifest_dict = self._adapter(adapter)
        manifest = AdapterManifest.from_dict(manifest_dict, f"adapter {name}")
        batch = cut_patches(volume_node, markups_node, manifest.spec)
        job = ScoreJob(logic=self, batch=batch, markups_node=markups_node, adapter=name,
                       version=manifest.version_id, label_names=tuple(manifest.label_names), tta=tta,
                       table_node=table_node, write_results_table=write_results_table)
        if len(batch.patches):
            if self.engine_ready():
                job.send()
            else:
                job.preparing = self._worker.submit(self.prepare_engine)
        return job

    def score(self, volume_node, markups_node, adapter: str | None = None, table_node=None,
              tta: bool = True, write_results_table: bool = True) -> tuple[object, list[ScoreRow]]:
        """Score every control point; returns the results table node and the rows."""
        job = self.begin_score(volume_node, markups_node, adapter, table_node, tta, write_results_table)
        rows = job.wait(self.engine.config.start_timeout_s + self.engine.config.request_timeout_s)
        return job.table_node, rows

    # --- crops ---------------------------------------------------------------------------
    def cube_to_volume(self, volume_node, point: ScenePoint, spec: PatchSpec, name: str | None = None):
        """The ``cube`` patch around a point as a new volume node in HU, placed exactly where it was cut.

        It has the adapter's field of view and size whatever its view set, so it overlays
        the CT in the slice views and its values read as Hounsfield units.
        """
        spec = PatchSpec(views="cube", fov_mm=spec.fov_mm, pixels=spec.pixels, window_hu=None, normalisation="none")
        image = volume_to_ct_image(volume_node)
        cube = extract_patches(image, np.array([point.nodule.centre_lps]), spec)[0]
        geometry = cube_geometry(np.asarray(point.nodule.centre_lps), spec)
        return add_volume_node(self.scene, CTImage(voxels_hu=cube, geometry=geometry),
                               name or f"{point.name} cube")

    def close(self) -> None:
        """Shut the engine down (module unloaded, application closing)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlora-engine")
        self.engine.close()

