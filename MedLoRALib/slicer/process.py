"""Child processes that can be watched line by line and stopped as a whole tree, without waiting.

The logic receives a ``ProcessRunner`` in its constructor. Two runners keep one contract:
``SubprocessRunner`` (here: ``subprocess`` with reader threads; scripts, tests, headless
use) and ``QtProcessRunner`` (``qt_process.py``: ``qt.QProcess`` and its signals, inside
Slicer, where reader threads can starve under PythonQt while the application is idle).

Stopping never blocks the caller: ``stop`` asks the process to end (its stop file, else
SIGTERM) and returns; each later ``poll`` checks it, and once the grace period is over
ends whatever is left of the tree. ``cancel`` is the waiting form, for scripts.

psutil is not part of Slicer's Python: it is imported on use (after the one-confirmation
dependency install), never when this module loads.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

STDERR_TAIL_LINES = 40
#: Windows: no console window for each child (``subprocess.CREATE_NO_WINDOW``, Python ≥ 3.7).
CREATION_FLAGS = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0

# Windows NTSTATUS codes a crashed child (or Slicer's launcher passing on its child's status) exits with.
_WINDOWS_STATUS = {0xC0000005: "an access violation (crash)", 0xC00000FD: "a stack overflow",
                   0xC0000409: "a buffer overrun check (crash)", 0xC0000017: "no memory left",
                   0xC000013A: "Ctrl+C / window closed", 0x40010004: "being terminated by the system"}


def describe_exit(code: int | None) -> str:
    """An exit status in words, whoever reports it.

    ``subprocess`` gives a negative number for a signal; a process started through Slicer's
    launcher (``PythonSlicer``, ``Slicer --launch``) or a shell reports the launched program's
    death by signal N as ``128 + N`` instead, and on Windows a crash as an NTSTATUS code
    (``0xC0000005``...), which ``QProcess`` and ``subprocess`` return as a large positive number.
    """
    if code is None:
        return "still running"
    if code < 0:
        return _signal_words(-code)
    if code > 0xFFFF:
        meaning = _WINDOWS_STATUS.get(code & 0xFFFFFFFF, "a Windows error status")
        return f"exit code {code:#010x}: {meaning}"
    if 128 < code < 128 + 65 and sys.platform != "win32":
        return f"exit code {code}: {_signal_words(code - 128)} (as reported by Slicer's launcher or a shell)"
    return f"exit code {code}"


def _signal_words(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    hint = ", e.g. by the system when memory ran out" if name == "SIGKILL" else ""
    return f"killed by {name}{hint}"


class ProcessHandle(Protocol):
    """A running child: its output lines, its exit code, and ways to end it."""

    pid: int

    def send(self, line: str) -> None: ...
    def read_lines(self, timeout: float = 0.0) -> list[str]: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def stderr_tail(self) -> str: ...
    def drained(self) -> bool: ...
    def stop(self, grace_s: float = 10.0) -> None: ...
    def cancel(self, grace_s: float = 10.0) -> int | None: ...


class ProcessRunner(Protocol):
    def start(self, args: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None,
              stop_file: str | None = None) -> ProcessHandle: ...


def kill_process_tree(pid: int, descendants: list | None = None) -> list[int]:
    """Kill ``pid`` and all its descendants now, children first; returns the pids that were alive.

    ``descendants`` may be a snapshot taken earlier, so grandchildren that were orphaned
    when their parent exited are still found. Does not wait for them to disappear.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        tree = root.children(recursive=True)
    except psutil.NoSuchProcess:
        root, tree = None, []
    known = {p.pid: p for p in (descendants or [])}
    known.update({p.pid: p for p in tree})
    procs = list(known.values()) + ([root] if root is not None else [])
    killed = []
    for proc in procs:
        try:
            if proc.is_running():
                proc.kill()
                killed.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


def descendants_of(pid: int) -> list:
    """A snapshot of a process's descendants (``psutil.Process`` objects)."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def touch_stop_file(path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"stop requested at {time.time():.0f}\n")


class StoppableHandle:
    """The stop contract shared by both runners' handles.

    Subclasses provide ``_exit_code()`` (``None`` while running), ``_terminate()`` and
    ``pid``; this class adds the non-blocking ``stop`` with its escalation in ``poll``.
    """

    pid: int
    stop_file: str | None = None
    _stop_deadline: float | None = None
    _stop_descendants: list | None = None
    _terminated: bool = False

    def _exit_code(self) -> int | None:
        raise NotImplementedError

    def _terminate(self) -> None:
        raise NotImplementedError

    def drained(self) -> bool:
        """The process has exited and every line it printed can be read (never waits)."""
        return self._exit_code() is not None

    @property
    def stopping(self) -> bool:
        return self._stop_deadline is not None

    def stop(self, grace_s: float = 10.0) -> None:
        """Ask the process to end and return at once; ``poll`` ends the tree after ``grace_s``.

        With a stop file (``medlora train --stop-file``) the process gets the grace period
        to save a resumable checkpoint; without one it gets SIGTERM now.
        """
        if self._stop_deadline is not None:
            self._stop_deadline = min(self._stop_deadline, time.monotonic() + grace_s)
            return
        self._stop_deadline = time.monotonic() + grace_s
        self._stop_descendants = descendants_of(self.pid)
        if self._exit_code() is not None:
            return
        if self.stop_file:
            touch_stop_file(self.stop_file)
        else:
            self._terminate()
            self._terminated = True

    def poll(self) -> int | None:
        """The exit code, ``None`` while running; ends the tree once a stop's grace is over."""
        code = self._exit_code()
        if self._stop_deadline is None:
            return code
        if code is None and time.monotonic() >= self._stop_deadline:
            if self.stop_file and not self._terminated:  # the stop file was not honoured in time
                self._terminate()
                self._terminated = True
                self._stop_deadline = time.monotonic() + 2.0
            else:
                kill_process_tree(self.pid, self._stop_descendants)
                self._stop_deadline = time.monotonic() + 60.0
        elif code is not None and self._stop_descendants:
            kill_process_tree(self.pid, self._stop_descendants)  # orphaned grandchildren
            self._stop_descendants = []
        return code

    def cancel(self, grace_s: float = 10.0) -> int | None:
        """Stop and wait until the whole tree has ended (scripts, tests; the GUI uses ``stop``)."""
        self.stop(grace_s)
        tree = list(self._stop_descendants or [])
        while self.poll() is None:
            time.sleep(0.02)
        code = self.wait(timeout=grace_s + 5.0)
        if tree:
            import psutil

            psutil.wait_procs(tree, timeout=5.0)
        return code


class SubprocessHandle(StoppableHandle):
    """A ``subprocess.Popen`` with reader threads for stdout lines and the stderr tail."""

    def __init__(self, popen: subprocess.Popen, stop_file: str | None = None) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stop_file = stop_file
        self._lines: queue.Queue[str] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._send_lock = threading.Lock()
        self._readers = [threading.Thread(target=self._pump, args=(popen.stdout, self._lines.put), daemon=True),
                         threading.Thread(target=self._pump, args=(popen.stderr, self._stderr.append), daemon=True)]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in iter(stream.readline, ""):
            sink(line.rstrip("\r\n"))
        stream.close()

    def send(self, line: str) -> None:
        """Write one line to the child's stdin; ``BrokenPipeError`` if it has gone."""
        with self._send_lock:
            if self._popen.stdin is None:
                raise BrokenPipeError("this process was started without stdin")
            self._popen.stdin.write(line.rstrip("\n") + "\n")
            self._popen.stdin.flush()

    def read_lines(self, timeout: float = 0.0) -> list[str]:
        """All stdout lines received so far; waits up to ``timeout`` s for the first one."""
        lines = []
        try:
            lines.append(self._lines.get(timeout=timeout) if timeout > 0 else self._lines.get_nowait())
            while True:
                lines.append(self._lines.get_nowait())
        except queue.Empty:
            pass
        return lines

    def _exit_code(self) -> int | None:
        return self._popen.poll()

    def _terminate(self) -> None:
        try:
            self._popen.terminate()
        except OSError:
            pass  # already gone

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit and the last output lines (blocking: scripts and tests only)."""
        try:
            code = self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(timeout=2.0)
        return code

    def drained(self) -> bool:
        # orphaned grandchildren may hold the pipes open: the caller gives up after a while
        return self._popen.poll() is not None and not any(reader.is_alive() for reader in self._readers)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)


class SubprocessRunner:
    """Runs commands as real child processes (headless default; no console window on Windows)."""

    def start(self, args: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None,
              stop_file: str | None = None) -> SubprocessHandle:
        try:
            popen = subprocess.Popen(list(args), cwd=cwd, env=child_environment(env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     encoding="utf-8", errors="replace", creationflags=CREATION_FLAGS)
        except OSError as exc:
            raise start_error(args, exc) from exc
        return SubprocessHandle(popen, stop_file=stop_file)


def child_environment(env: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment plus ``env``, unbuffered (Slicer's own ``os.environ`` is never changed)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return full_env


def start_error(args: Sequence[str], exc: object):
    from ..errors import MedLoRAError

    return MedLoRAError(f"cannot start {args[0]!r}: {exc}. Check the Python interpreter set for MedLoRA's engine "
                        "in the module settings.")


class Reaper:
    """Processes that were asked to stop and are left to end on their own; ``poll`` advances them."""

    def __init__(self) -> None:
        self.handles: list[ProcessHandle] = []

    def add(self, handle: ProcessHandle, grace_s: float = 5.0) -> None:
        handle.stop(grace_s)
        self.handles.append(handle)

    def poll(self) -> bool:
        """Forget the processes that have ended; True while some are still ending."""
        self.handles = [h for h in self.handles if h.poll() is None]
        return bool(self.handles)
