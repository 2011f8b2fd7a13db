"""The process runner inside Slicer: ``qt.QProcess`` driven by its signals, as SlicerNNUnet does.

Reader threads under PythonQt can starve while Slicer is idle, so inside the application the
engine and the trainer are ``QProcess`` children whose ``readyReadStandardOutput``,
``readyReadStandardError`` and ``finished`` signals, delivered by Slicer's event loop, fill
the same line queue and stderr tail that ``SubprocessHandle`` keeps. The contract
(``send``, ``read_lines``, ``poll``, ``wait``, ``stop``, ``cancel``, ``stderr_tail``) is the one
in ``process.py``, stop and escalation included (``StoppableHandle``), so the logic cannot tell
the runners apart. ``qt`` is imported when a process starts, never when this module loads.
Not testable outside Slicer (no Qt in ``slicer-core``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

from .process import STDERR_TAIL_LINES, StoppableHandle, child_environment, start_error


class QtProcessHandle(StoppableHandle):
    def __init__(self, process, stop_file: str | None = None) -> None:
        self._process = process
        self.pid = int(process.processId())  # QProcess.processId: Qt >= 5.3
        self.stop_file = stop_file
        self._lines: collections.deque[str] = collections.deque()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = {"out": "", "err": ""}
        self._code: int | None = None
        process.readyReadStandardOutput.connect(self._on_stdout)
        process.readyReadStandardError.connect(self._on_stderr)
        process.finished.connect(self._on_finished)

    def _take(self, key: str, data) -> list[str]:
        text = self._partial[key] + bytes(data.data()).decode("utf-8", "replace")
        *lines, self._partial[key] = text.split("\n")
        return [line.rstrip("\r") for line in lines]

    def _on_stdout(self) -> None:
        self._lines.extend(self._take("out", self._process.readAllStandardOutput()))

    def _on_stderr(self) -> None:
        self._stderr.extend(self._take("err", self._process.readAllStandardError()))

    def _on_finished(self, *args) -> None:
        self._on_stdout()
        self._on_stderr()
        for key, sink in (("out", self._lines.extend), ("err", self._stderr.extend)):
            if self._partial[key]:
                sink([self._partial[key]])
                self._partial[key] = ""
        crashed = self._process.exitStatus() == self._process.CrashExit
        self._code = -9 if crashed and self._process.exitCode() == 0 else int(self._process.exitCode())

    def send(self, line: str) -> None:
        import qt

        if self._code is not None:
            raise BrokenPipeError("the process has exited")
        self._process.write(qt.QByteArray((line.rstrip("\n") + "\n").encode("utf-8")))

    def read_lines(self, timeout: float = 0.0) -> list[str]:
        if not self._lines and timeout > 0 and self._code is None:
            self._process.waitForReadyRead(int(timeout * 1000))  # blocking form: scripts only
        self._on_stdout()  # what the signal has not delivered yet
        lines = list(self._lines)
        self._lines.clear()
        return lines

    def _exit_code(self) -> int | None:
        if self._code is None and self._process.state() == self._process.NotRunning:
            self._on_finished()  # exited, ``finished`` not delivered yet
        return self._code

    def _terminate(self) -> None:
        self._process.terminate()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._code is None:
            self._process.waitForFinished(-1 if timeout is None else int(timeout * 1000))
            if self._process.state() == self._process.NotRunning and self._code is None:
                self._on_finished()
        return self._code

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)


class QtProcessRunner:
    """Starts ``qt.QProcess`` children with the environment and working folder asked for."""

    def start(self, args: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None,
              stop_file: str | None = None) -> QtProcessHandle:
        import qt

        process = qt.QProcess()
        environment = qt.QProcessEnvironment()
        for key, value in child_environment(env).items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        if cwd:
            process.setWorkingDirectory(cwd)
        process.start(args[0], list(args[1:]))
        if not process.waitForStarted(10000):  # returns as soon as the executable runs
            raise start_error(args, process.errorString())
        return QtProcessHandle(process, stop_file=stop_file)
