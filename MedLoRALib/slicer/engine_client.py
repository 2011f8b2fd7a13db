"""Client of the scoring engine, ``medlora serve``: JSON lines over the child's stdin/stdout.

The engine keeps the backbone and several adapters loaded, so the client starts it once
and reuses it. Every request carries an id and its response is matched by id. When
the engine dies (crash, out of memory) the pending request fails with its exit code and
stderr tail, and the next request starts a new engine. ``submit``/``poll`` never
block (for a Qt timer); ``request`` waits (scripts, tests).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import MedLoRAError
from ..tta import resolve_tta
from .process import ProcessHandle, ProcessRunner, SubprocessRunner, describe_exit

log = logging.getLogger(__name__)


class EngineError(MedLoRAError):
    """The engine could not be started, died, timed out or refused a request."""


def default_python() -> str:
    """Interpreter for the engine: PythonSlicer inside Slicer, else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


@dataclass
class EngineConfig:
    """How to launch and talk to the engine.

    Args:
        python: interpreter with torch/timm/peft and MedLoRALib installed (``None``:
            PythonSlicer inside Slicer, else the current interpreter).
        extra_args: appended to ``-m MedLoRALib serve`` (e.g. ``["--device", "cpu"]``).
        env: extra environment variables for the engine (``HF_HUB_OFFLINE`` is set).
        start_timeout_s: how long to wait for the ``ready`` line (backbone loading).
        request_timeout_s: how long to wait for one response.
    """

    python: str | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"HF_HUB_OFFLINE": "1"})
    start_timeout_s: float = 120.0
    request_timeout_s: float = 120.0

    def command(self) -> list[str]:
        return [self.python or default_python(), "-m", "MedLoRALib", "serve", *self.extra_args]


def encode_patches(patches: np.ndarray) -> dict:
    """Patches as the protocol's base64 float32 blob."""
    array = np.ascontiguousarray(patches, dtype=np.float32)
    return {"dtype": "float32", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def tta_param(tta: bool | int | str) -> bool | int | str:
    """A ``tta`` setting as the ``score`` request carries it (a numpy count as a plain int); ``TTAError``
    for a setting the engine would refuse, so it is refused before anything is cut or sent."""
    resolve_tta(tta)
    return tta if isinstance(tta, (bool, str)) else int(tta)


class EngineClient:
    """Talks to one ``medlora serve`` process, restarting it after it dies."""

    def __init__(self, config: EngineConfig | None = None, runner: ProcessRunner | None = None) -> None:
        self.config = config or EngineConfig()
        self.runner = runner or SubprocessRunner()
        self._handle: ProcessHandle | None = None
        self._ids = itertools.count(1)
        self._responses: dict[int, dict] = {}
        self._pending: dict[int, tuple[str, float]] = {}
        self._ignored: set[int] = set()
        self.ready_info: dict = {}
        self.starts = 0
        self.restart_reason: str | None = None  # why the last engine stopped unasked, if it did

    # --- process ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._handle.pid if self._handle is not None and self._handle.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    _start_deadline = 0.0
    _exited_at: float | None = None

    def launch(self) -> None:
        """Start the engine process if none runs, without waiting for it (see ``ready``)."""
        if self.is_running():
            return
        if self._handle is not None:  # it died between requests: say why once, then start afresh
            self.restart_reason = str(self._died("between requests"))
            log.warning("%s", self.restart_reason)
        self._handle = self.runner.start(self.config.command(), env=self.config.env)
        self.starts += 1
        self._exited_at = None
        self.ready_info = {}
        self._responses.clear()
        self._pending.clear()
        self._start_deadline = time.monotonic() + self.config.start_timeout_s

    def ready(self, timeout: float = 0.0) -> bool:
        """True once the engine has said ``ready``; never waits longer than ``timeout``.

        Raises ``EngineError`` if it died or did not start in time.
        """
        if self.ready_info and self.is_running():
            return True
        if self._handle is None:
            raise EngineError("the scoring engine is not running; it starts with the next request.")
        for line in self._handle.read_lines(timeout=timeout):
            message = _parse(line)
            if message.get("event") == "ready":
                self.ready_info = message
                return True
        if self._handle.poll() is not None:
            raise self._died("while starting")
        if time.monotonic() > self._start_deadline:
            handle, self._handle = self._handle, None
            handle.stop(grace_s=0.0)
            handle.poll()
            raise EngineError(f"the scoring engine did not start within {self.config.start_timeout_s:.0f} s "
                              f"(command: {' '.join(self.config.command())}). Its last messages:\n"
                              f"{handle.stderr_tail()}")
        return False

    def start(self) -> dict:
        """Start the engine if it is not running and wait for its ``ready`` line (scripts)."""
        self.launch()
        while not self.ready(timeout=0.1):
            pass
        return self.ready_info

    def _died(self, when: str) -> EngineError:
        handle, self._handle = self._handle, None
        code = handle.poll()
        if code is None or not handle.drained():
            code = handle.wait(timeout=0.5)  # it has exited or is about to: its last lines
        tail = handle.stderr_tail().strip() or "(no output)"
        return EngineError(f"the scoring engine stopped {when} ({describe_exit(code)}); it will be restarted on "
                           f"the next request. Its last messages:\n{tail}")

    def detach(self, grace_s: float = 5.0) -> ProcessHandle | None:
        """Ask the engine to shut down and let go of it without waiting; returns its handle.

        The caller polls the handle (``process.Reaper``) until it has ended; the next request
        starts a new engine.
        """
        handle, self._handle = self._handle, None
        self.ready_info = {}
        if handle is None or handle.poll() is not None:
            return None
        try:
            handle.send(json.dumps({"id": next(self._ids), "op": "shutdown"}))
        except (BrokenPipeError, OSError, ValueError):
            pass  # it is being ended in any case
        handle.stop(grace_s)
        return handle

    def close(self) -> None:
        """Shut the engine down and wait for its whole tree to end (scripts, tests)."""
        handle = self.detach()
        if handle is not None:
            handle.cancel(grace_s=5.0)

    def kill(self) -> ProcessHandle | None:
        """End the engine's process tree now (cancel), without waiting; returns its handle to reap."""
        handle, self._handle = self._handle, None
        self.ready_info = {}
        if handle is not None:
            handle.stop(grace_s=0.0)
            handle.poll()
        return handle

    # --- requests --------------------------------------------------------------------
    def submit(self, op: str, **params) -> int:
        """Send a request without waiting; returns its id (starts the engine if needed)."""
        self.start()
        request_id = next(self._ids)
        line = json.dumps({"id": request_id, "op": op, **params})
        try:
            self._handle.send(line)
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise self._died(f"before '{op}' could be sent ({exc.__class__.__name__})") from exc
        self._pending[request_id] = (op, time.monotonic())
        return request_id

    def poll(self, request_id: int) -> dict | None:
        """The result of a finished request, ``None`` while it runs; raises its error."""
        self._drain()
        if request_id not in self._responses and self._handle is not None and self._handle.poll() is not None:
            self._exited_at = self._exited_at or time.monotonic()
            if not self._handle.drained() and time.monotonic() - self._exited_at < 2.0:
                return None  # its last lines are still on their way
            self._drain()
        if request_id in self._responses:
            op = self._pending.pop(request_id, ("request", 0.0))[0]
            return _unwrap(self._responses.pop(request_id), op)
        if self._handle is None or self._handle.poll() is not None:
            op = self._pending.pop(request_id, ("request", 0.0))[0]
            if self._handle is None:
                raise EngineError(f"the scoring engine stopped before answering '{op}'; it will be restarted "
                                  "on the next request.")
            raise self._died(f"while answering '{op}'")
        return None

    def notify(self, op: str, **params) -> None:
        """Send a request to the running engine and ignore its answer (never waits)."""
        if self.ready_info and self.is_running():
            self._ignored.add(self.submit(op, **params))

    def _drain(self, timeout: float = 0.0) -> None:
        if self._handle is None:
            return
        for line in self._handle.read_lines(timeout=timeout):
            message = _parse(line)
            request_id = message.get("id")
            if isinstance(request_id, int):
                if request_id in self._ignored:
                    self._ignored.discard(request_id)
                    self._pending.pop(request_id, None)
                else:
                    self._responses[request_id] = message

    def request(self, op: str, timeout_s: float | None = None, **params) -> dict:
        """Send a request and wait for its result."""
        request_id = self.submit(op, **params)
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.poll(request_id)
            if result is not None:
                return result
            if time.monotonic() > deadline:
                self._pending.pop(request_id, None)
                raise EngineError(f"the scoring engine did not answer '{op}' within {timeout_s:.0f} s; it is "
                                  "still running. Try again, or restart it.")
            self._drain(timeout=0.05)

    # --- protocol operations ---------------------------------------------------------
    def status(self) -> dict:
        return self.request("status")

    def attach_adapter(self, path: str, name: str | None = None, weights: str | None = None) -> dict:
        params = {"path": str(path)}
        if name:
            params["name"] = name
        if weights:
            params["weights"] = str(weights)
        return self.request("attach_adapter", **params)

    def set_adapter(self, name: str) -> dict:
        return self.request("set_adapter", name=name)

    def detach_adapter(self, name: str) -> dict:
        return self.request("detach_adapter", name=name)

    def score(self, patches: np.ndarray, adapter: str | None = None, tta: bool | int | str = True) -> list[dict]:
        """Score patches (waits); ``tta``: True (the adapter's own set), False, a count or a set name
        (``TTAError`` otherwise, before anything is sent)."""
        params = {"patches": encode_patches(patches), "tta": tta_param(tta)}
        if adapter:
            params["adapter"] = adapter
        return self.request("score", **params)["results"]


def _parse(line: str) -> dict:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return message if isinstance(message, dict) else {}


def _unwrap(message: dict, op: str) -> dict:
    if message.get("ok"):
        return message.get("result") or {}
    error = message.get("error") or {}
    raise EngineError(f"{op}: {error.get('type', 'Error')}: {error.get('message', 'no message')}")
