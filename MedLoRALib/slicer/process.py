"""Child processes that can be watched line by line and cancelled as a whole tree.

The logic receives a ``ProcessRunner`` in its constructor: the default one below runs
real commands with ``subprocess``; a test or the Qt widget may pass another. Output is
read on background threads into queues, so the owner polls without blocking — from a
Qt timer in Slicer or a loop in a headless test.
"""

from __future__ import annotations

import collections
import os
import queue
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import psutil

STDERR_TAIL_LINES = 40


class ProcessHandle(Protocol):
    """A running child: its output lines, its exit code, and a way to end it."""

    pid: int

    def send(self, line: str) -> None: ...
    def read_lines(self, timeout: float = 0.0) -> list[str]: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def stderr_tail(self) -> str: ...
    def cancel(self, grace_s: float = 10.0) -> int | None: ...


class ProcessRunner(Protocol):
    def start(self, args: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None,
              stop_file: str | None = None) -> ProcessHandle: ...


def kill_process_tree(pid: int, timeout_s: float = 5.0, descendants: list | None = None) -> list[int]:
    """End ``pid`` and all its descendants, children first; return the pids that were alive.

    ``descendants`` may be a snapshot taken earlier, so grandchildren that were orphaned
    when their parent exited are still found.
    """
    try:
        root = psutil.Process(pid)
        tree = root.children(recursive=True)
    except psutil.NoSuchProcess:
        root, tree = None, []
    known = {p.pid: p for p in (descendants or [])}
    known.update({p.pid: p for p in tree})
    procs = list(known.values()) + ([root] if root is not None else [])
    alive = [p for p in procs if p.is_running()]
    for proc in alive:  # children first, then the root
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, still_alive = psutil.wait_procs(alive, timeout=timeout_s)
    for proc in still_alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(still_alive, timeout=timeout_s)
    return [p.pid for p in alive]


class SubprocessHandle:
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

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            code = self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(timeout=2.0)
        return code

    def _exited_within(self, timeout: float) -> int | None:
        """Wait for the process only (its orphaned children may still hold the pipes)."""
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def cancel(self, grace_s: float = 10.0) -> int | None:
        """Ask the process to stop (stop file, then SIGTERM), then end the whole tree.

        A process that honours the request gets ``grace_s`` seconds to save its state
        (a training checkpoint) and exit; whatever is left of the tree is then killed,
        children first.
        """
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.poll() is None:
            if self.stop_file:
                _touch(self.stop_file)
            else:
                self._popen.terminate()
            if self._exited_within(grace_s) is None and self.stop_file:
                self._popen.terminate()
                self._exited_within(grace_s)
        kill_process_tree(self.pid, descendants=descendants)
        return self.wait(timeout=grace_s)


def _touch(path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"stop requested at {time.time():.0f}\n")


class SubprocessRunner:
    """Runs commands as real child processes (the default runner).

    Args:
        stop_file: if set, ``cancel`` first creates this file (``medlora train --stop-file``).
    """

    def start(self, args: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None,
              stop_file: str | None = None) -> SubprocessHandle:
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            popen = subprocess.Popen(list(args), cwd=cwd, env=full_env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     encoding="utf-8", errors="replace")
        except OSError as exc:
            from ..errors import MedLoRAError

            raise MedLoRAError(f"cannot start {args[0]!r}: {exc}. Check the Python interpreter set for "
                               "MedLoRA's engine in the module settings.") from exc
        return SubprocessHandle(popen, stop_file=stop_file)
