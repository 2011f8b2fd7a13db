"""A scoring session: the engine, the adapters it holds, and score jobs that fill the results table.

``ScoringSession`` owns one ``medlora serve`` engine client (started on first use, kept warm
with several adapters loaded), the adapters registered for it, and turns a volume and its
marked points into patches (cut here, torch-free) and a ``ScoreJob``. Nothing here waits
on the engine unless asked to: a score job starts the engine, loads the adapters it lacks
and sends the patches as a sequence of non-blocking steps, advanced by ``poll`` (a Qt timer
in Slicer). The plain ``score`` waits (scripts, tests). Given several adapters, a score job asks
the engine for an ensemble (one ``score`` request with ``adapters``): the set is checked here from the
manifests (``ensemble.check_compatible``) before any patch is cut. Engines that were asked to stop are
reaped in the background (``process.Reaper``), so a restart never waits for the old one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..adapters import AdapterManifest, read_manifest
from ..adapters.store import check_name
from ..ensemble import check_compatible
from ..errors import MedLoRAError
from ..nodule import centres_lps
from ..patches import PatchSpec, check_inside, extract_patches
from .engine_client import EngineClient, EngineConfig, EngineError, encode_patches, tta_param
from .jobs import EngineRequestJob
from .mrml import ScenePoint, UnplacedPoint, markups_to_points, unplaced_points, volume_to_ct_image
from .process import ProcessRunner, Reaper, SubprocessRunner
from .results import ScoreRow, colour_control_points, write_table


@dataclass
class PatchBatch:
    """Patches cut for the marked points of one volume; points outside it get an error."""

    volume_name: str
    points: list[ScenePoint]
    inside: np.ndarray
    patches: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    unplaced: list[UnplacedPoint] = field(default_factory=list)


def cut_patches(volume_node, markups_node, spec: PatchSpec) -> PatchBatch:
    """Cut the adapter's patches for every control point, in Slicer's process (no torch)."""
    image = volume_to_ct_image(volume_node)
    points = markups_to_points(markups_node, case_id=volume_node.GetName())
    unplaced = unplaced_points(markups_node)
    if not points and not unplaced:
        raise MedLoRAError(f"'{markups_node.GetName()}' has no placed points: click on the nodules first.")
    centres = centres_lps([p.nodule for p in points]) if points else np.zeros((0, 3))
    inside = image.geometry.contains_lps(centres) if points else np.zeros(0, bool)
    errors = {i: (f"point at RAS ({p.position_ras[0]:.1f}, {p.position_ras[1]:.1f}, {p.position_ras[2]:.1f}) mm "
                  f"lies outside volume '{volume_node.GetName()}'")
              for i, p in enumerate(points) if not inside[i]}
    patches = (extract_patches(image, centres[inside], spec, require_inside=False) if inside.any()
               else np.zeros((0, *spec.shape), np.float32))
    return PatchBatch(volume_name=volume_node.GetName(), points=points, inside=inside, patches=patches,
                      errors=errors, unplaced=unplaced)


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
            row.tta = str(result.get("tta") or "")
            if "spread" in result:  # an ensemble's result
                row.spread, row.disagree = float(result["spread"]), bool(result["disagree"])
                row.members = {str(m["adapter"]): float(m["probability"]) for m in result["members"]}
        else:
            row.error = batch.errors[i]
        rows.append(row)
    nan = float("nan")
    rows += [ScoreRow(volume=batch.volume_name, nodule=p.name, point_id=p.point_id, r=nan, a=nan, s=nan,
                      adapter=adapter, adapter_version=version, error=p.reason) for p in batch.unplaced]
    return rows


class EngineSetup:
    """Brings the engine to the point where it holds every registered adapter, without waiting.

    ``poll`` launches the engine, waits for its ``ready`` line, sends one ``attach_adapter``
    per adapter it lacks and collects the answers; True once done.
    """

    def __init__(self, session: ScoringSession) -> None:
        self.session = session
        self.pending: dict[int, str] | None = None
        session.engine.launch()

    def poll(self) -> bool:
        session, engine = self.session, self.session.engine
        if not engine.is_running() and self.pending is None:
            engine.launch()
        if not engine.ready():
            return False
        session.sync_generation()
        if self.pending is None:
            self.pending = {}
            for name, (path, weights) in session.sources.items():
                if name not in session.in_engine:
                    params = {"path": path, "name": name, **({"weights": weights} if weights else {})}
                    self.pending[engine.submit("attach_adapter", **params)] = name
        for request_id, name in list(self.pending.items()):
            try:
                answer = engine.poll(request_id)
            except EngineError:
                session.forget(name)
                raise
            if answer is not None:
                session.in_engine.add(name)
                del self.pending[request_id]
        return not self.pending


class EngineCall:
    """One request to the engine, sent once the engine holds every registered adapter; never waits.

    ``poll`` returns the answer once it is in (``None`` until then); the request's
    parameters are built when it is sent. ``starting`` is true while the engine is being
    set up, ``sent`` once the request is with the engine.
    """

    def __init__(self, session: ScoringSession, op: str, params: Callable[[], dict]) -> None:
        self.session, self.op, self._params = session, op, params
        self.request_id: int | None = None
        self.setup = None if session.engine_ready() else EngineSetup(session)
        if self.setup is None:
            self._send()

    @property
    def starting(self) -> bool:
        return self.setup is not None

    @property
    def sent(self) -> bool:
        return self.request_id is not None

    def _send(self) -> None:
        self.request_id = self.session.engine.submit(self.op, **self._params())

    def poll(self) -> dict | None:
        if self.setup is not None:
            if not self.setup.poll():
                return None
            self.setup = None
            self._send()
        return self.session.engine.poll(self.request_id)


@dataclass
class ScoreJob(EngineRequestJob):
    """One volume's points being scored; ``poll`` advances it, True once the rows are in.

    Stages: ``engine`` (starting it, loading adapters), ``score`` (the request is with the
    engine), ``done``. Follows the job interface of ``jobs.py``.
    """

    session: ScoringSession
    batch: PatchBatch
    markups_node: object
    adapter: str
    version: str
    label_names: tuple[str, str]
    tta: bool | int | str = True  # True: each adapter's own set (its manifest's tta); each row records the set used
    table_node: object = None
    write_results_table: bool = True
    members: list[str] | None = None  # an ensemble's adapters (``adapter`` then joins their names)
    call: EngineCall | None = None  # None when no point lies inside the volume
    rows: list[ScoreRow] | None = None
    cancelled: bool = False
    error: str | None = None

    @property
    def stage(self) -> str:
        if self.rows is not None:
            return "done"
        return "engine" if self.call is not None and self.call.starting else "score"

    @property
    def finished(self) -> bool:
        return self.rows is not None

    @property
    def status(self) -> str:
        if self.cancelled:
            return "scoring cancelled"
        if self.error:
            return f"scoring failed: {self.error}"
        if self.rows is not None:
            return f"{len(self.rows)} nodules scored"
        return self.waiting_status("scoring…")

    @property
    def results_table(self):
        return self.table_node

    def start(self) -> ScoreJob:
        if len(self.batch.patches):
            chosen = {"adapters": self.members} if self.members else {"adapter": self.adapter}
            self.call = EngineCall(self.session, "score", lambda: {
                "patches": encode_patches(self.batch.patches), **chosen, "tta": self.tta})
        return self

    def poll(self) -> bool:
        """Advance without waiting; True once finished. Engine errors are raised (a ``MedLoRAError``)."""
        if self.rows is not None:
            return True
        results = []
        if self.call is not None:
            answer = self.call.poll()
            if answer is None:
                return False
            results = answer["results"]
        self.rows = rows_from_results(self.batch, results, self.adapter, self.version, self.label_names)
        if self.write_results_table:
            self.table_node = write_table(self.session.scene, self.rows, self.table_node)
        colour_control_points(self.markups_node, self.rows)
        return True

    def cancel(self) -> None:
        """Give up on this request: a score being computed is stopped by ending the engine (never waits)."""
        if self.rows is not None:
            return
        self.cancelled = True
        if self.call is not None and self.call.sent:
            self.session.kill_engine()  # restarted on the next request
        self.rows = []

    def wait(self, timeout_s: float = 300.0) -> list[ScoreRow]:
        deadline = time.monotonic() + timeout_s
        while not self.poll():
            if time.monotonic() > deadline:
                raise MedLoRAError(f"scoring did not finish within {timeout_s:.0f} s")
            time.sleep(0.02)
        return self.rows


class ScoringSession:
    """The engine, its adapters and scoring on one MRML scene.

    Adapters are registered here (their manifest read from disk, torch-free) and loaded
    into the engine when it is next needed, together with any the engine lost by
    restarting.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer).
        engine: the scoring engine client (default: ``medlora serve`` started on first use).
        runner: runs the engine and training processes (default: ``SubprocessRunner``;
            inside Slicer the module passes ``QtProcessRunner``).
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
        self.sources: dict[str, tuple[str, str | None]] = {}  # name -> (path, backbone weights)
        self.active_adapter: str | None = None
        self._engine_generation = 0  # the engine start that in_engine describes
        self.in_engine: set[str] = set()  # registered adapters loaded into that engine
        self.reaper = Reaper()  # engines asked to stop, left to end in the background

    # --- adapters ----------------------------------------------------------------------
    def register_adapter(self, path: str, name: str | None = None, weights: str | None = None) -> str:
        """Make an adapter available under ``name``; the engine loads it when next needed."""
        manifest = read_manifest(path)
        name = check_name(name or manifest.name)
        self.adapters[name] = manifest.to_dict()
        self.sources[name] = (str(path), None if weights is None else str(weights))
        self.in_engine.discard(name)
        if self.active_adapter is None:
            self.active_adapter = name
        return name

    def attach_adapter(self, path: str, name: str | None = None, weights: str | None = None) -> str:
        """Register an adapter and load it into the engine now, waiting (scripts, tests)."""
        name = self.register_adapter(path, name, weights)
        self.prepare_engine()
        return name

    def detach_adapter(self, name: str) -> None:
        """Forget an adapter here and tell the engine to unload it (never waits for the answer)."""
        if name not in self.adapters:
            return
        if name in self.in_engine:
            self.engine.notify("detach_adapter", name=name)
        self.forget(name)

    def forget(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.sources.pop(name, None)
        self.in_engine.discard(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def set_adapter(self, name: str) -> None:
        """Switch the active adapter: a message to the warm engine, no reload (waits; scripts)."""
        if name not in self.adapters:
            raise MedLoRAError(f"adapter '{name}' is not attached; attached: {', '.join(self.adapters) or 'none'}.")
        self.prepare_engine()
        self.engine.set_adapter(name)
        self.active_adapter = name

    def sync_generation(self) -> None:
        if self._engine_generation != self.engine.starts:  # a new engine holds none of them
            self._engine_generation, self.in_engine = self.engine.starts, set()

    def engine_ready(self) -> bool:
        """The engine runs, has said ready, and holds every registered adapter."""
        return (self.engine.is_running() and bool(self.engine.ready_info)
                and self._engine_generation == self.engine.starts and set(self.sources) <= self.in_engine)

    def prepare_engine(self, timeout_s: float | None = None) -> None:
        """Start the engine if needed and load the registered adapters it lacks, waiting."""
        config = self.engine.config
        deadline = time.monotonic() + (timeout_s or config.start_timeout_s + config.request_timeout_s)
        setup = EngineSetup(self)
        while not setup.poll():
            if time.monotonic() > deadline:
                raise EngineError("the scoring engine did not load the adapters in time.")
            time.sleep(0.02)

    def kill_engine(self) -> None:
        """End the engine now (a cancelled score); reaped in the background."""
        handle = self.engine.kill()
        if handle is not None:
            self.reaper.add(handle, grace_s=0.0)

    def restart_engine(self, extra_args: list[str] | None = None) -> None:
        """Let the running engine shut down in the background; the next request starts a new one."""
        handle = self.engine.detach()
        if handle is not None:
            self.reaper.add(handle)
        if extra_args is not None:
            self.engine.config.extra_args = list(extra_args)

    def _adapter(self, name: str | None) -> tuple[str, dict]:
        name = name or self.active_adapter
        if not name or name not in self.adapters:
            raise MedLoRAError("no adapter attached: choose an adapter (or import one) before scoring.")
        return name, self.adapters[name]

    def ensemble(self, adapters: list[str]) -> dict[str, AdapterManifest]:
        """The registered members' manifests, refused (``AdapterError``) unless they read the same patches
        of the same backbone; torch-free, so a bad set is refused before anything is cut or sent."""
        manifests = {}
        for given in adapters:
            name, manifest_dict = self._adapter(given)
            if name in manifests:
                raise MedLoRAError(f"adapter '{name}' is chosen twice for the ensemble; choose each once.")
            manifests[name] = AdapterManifest.from_dict(manifest_dict, f"adapter {name}")
        check_compatible(manifests)
        return manifests

    # --- scoring -------------------------------------------------------------------------
    def begin_score(self, volume_node, markups_node, adapter: str | list[str] | None = None, table_node=None,
                    tta: bool | int | str = True, write_results_table: bool = True) -> ScoreJob:
        """Cut patches here and start a score job; poll it (never blocks).

        ``adapter``: a registered adapter's name, or a list of names to score with as an ensemble.
        ``tta``: True scores with each adapter's own test-time augmentation set (its manifest's ``tta``;
        ``d8`` for adapters that record none), False without; a count or set name overrides it. Each
        row's ``tta`` is the set the engine used.
        """
        tta = tta_param(tta)  # a bad setting is refused before anything is cut or sent
        if isinstance(adapter, (list, tuple)) and len(adapter) > 1:
            manifests = self.ensemble(list(adapter))
            members = list(manifests)
            manifest = manifests[members[0]]
            name, version = "+".join(members), "+".join(m.version_id for m in manifests.values())
        else:
            if isinstance(adapter, (list, tuple)):
                adapter = adapter[0] if adapter else None
            members = None
            name, manifest_dict = self._adapter(adapter)
            manifest = AdapterManifest.from_dict(manifest_dict, f"adapter {name}")
            version = manifest.version_id
        batch = cut_patches(volume_node, markups_node, manifest.spec)
        job = ScoreJob(session=self, batch=batch, markups_node=markups_node, adapter=name,
                       version=version, label_names=tuple(manifest.label_names), tta=tta,
                       table_node=table_node, write_results_table=write_results_table, members=members)
        return job.start()

    def begin_explanation(self, volume_node, point: ScenePoint, method: str = "gradxinput",
                          adapter: str | None = None, opacity: float = 0.5):
        """Explain one point's score as an overlay on its CT; poll the returned job (never blocks).

        A point outside the volume is refused here, before the engine is asked.
        """
        from .explanation import METHODS, ExplainJob

        if method not in METHODS:
            raise MedLoRAError(f"explanation method {method!r}: choose one of {', '.join(METHODS)}.")
        name, manifest_dict = self._adapter(adapter)
        spec = AdapterManifest.from_dict(manifest_dict, f"adapter {name}").spec
        image = volume_to_ct_image(volume_node)
        check_inside(image, np.array([point.nodule.centre_lps]))
        return ExplainJob(session=self, volume_node=volume_node, image=image, point=point, adapter=name, spec=spec,
                          method=method, opacity=opacity).start()

    def score(self, volume_node, markups_node, adapter: str | list[str] | None = None, table_node=None,
              tta: bool | int | str = True, write_results_table: bool = True) -> tuple[object, list[ScoreRow]]:
        """Score every control point, waiting; returns the results table node and the rows."""
        job = self.begin_score(volume_node, markups_node, adapter, table_node, tta, write_results_table)
        rows = job.wait(self.engine.config.start_timeout_s + self.engine.config.request_timeout_s)
        return job.table_node, rows

    def close(self) -> None:
        """Shut the engine down and wait for it (scripts, tests, the application closing)."""
        self.engine.close()
        for handle in self.reaper.handles:
            handle.cancel(grace_s=0.0)
        self.reaper.handles = []

