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
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import MedLoRAError
from .process import ProcessHandle, ProcessRunner, SubprocessRunner

log = logging.getLogger(__name__)


class EngineError(MedLoRAError):
    """The engine could not be started, died, timed out or refused a request."""


def describe_exit(code: int | None) -> str:
    """An exit status in words: a signal's name (SIGKILL often means out of memory)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", e.g. by the system when memory ran out" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


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


class EngineClient:
    """Talks to one ``medlora serve`` process, restarting it after it dies."""

    def __init__(self, config: EngineConfig | None = None, runner: ProcessRunner | None = None) -> None:
        self.config = config or EngineConfig()
        self.runner = runner or SubprocessRunner()
        self._handle: ProcessHandle | None = None
        self._ids = itertools.count(1)
        self._responses: dict[int, dict] = {}
        self._pending: dict[int, tuple[str, float]] = {}
        self.ready_info: dict = {}
        self.starts = 0
        self.restart_reason: str | None = None  # why the last engine stopped unasked, if it did

    # --- process ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._handle.pid if self._handle is not None and self._handle.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> dict:
        """Start the engine if it is not running; return its ``ready`` line."""
        if self.is_running():
            return self.ready_info
        if self._handle is not None:  # it died between requests: say why once, then start afresh
            self.restart_reason = str(self._died("between requests"))
            log.warning("%s", self.restart_reason)
        self._handle = self.runner.start(self.config.command(), env=self.config.env)
        self.starts += 1
        self._responses.clear()
        self._pending.clear()
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            for line in self._handle.read_lines(timeout=0.1):
                message = _parse(line)
                if message.get("event") == "ready":
                    self.ready_info = message
                    return message
            if self._handle.poll() is not None and not self._handle.read_lines():
                raise self._died("while starting")
        handle, self._handle = self._handle, None
        handle.cancel(grace_s=2.0)
        raise EngineError(f"the scoring engine did not start within {self.config.start_timeout_s:.0f} s "
                          f"(command: {' '.join(self.config.command())}). Its last messages:\n"
                          f"{handle.stderr_tail()}")

    def _died(self, when: str) -> EngineError:
        handle, self._handle = self._handle, None
        code = handle.wait(timeout=5.0)
        tail = handle.stderr_tail().strip() or "(no output)"
        return EngineError(f"the scoring engine stopped {when} ({describe_exit(code)}); it will be restarted on "
                           f"the next request. Its last messages:\n{tail}")

    def close(self) -> None:
        """Ask the engine to shut down; end its process tree if it does not."""
        if not self.is_running():
            return
        try:
            self.request("shutdown", timeout_s=10.0)
        except EngineError:
            pass  # it is being ended below in any case
        if self._handle is not None:
            self._handle.cancel(grace_s=5.0)
        self._handle = None

    def kill(self) -> None:
        """End the engine's process tree now (cancel)."""
        if self._handle is not None:
            self._handle.cancel(grace_s=0.0)
        self._handle = None

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
            self._handle.wait(timeout=5.0)  # let the reader threads deliver the last lines
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

    def _drain(self, timeout: float = 0.0) -> None:
        if self._handle is None:
            return
        for line in self._handle.read_lines(timeout=timeout):
            message = _parse(line)
            if isinstance(message.get("id"), int):
                self._responses[message["id"]] = message

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

    def score(self, patches: np.ndarray, adapter: str | None = None, tta: bool = True) -> list[dict]:
        params = {"patches": encode_patches(patches), "tta": bool(tta)}
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
