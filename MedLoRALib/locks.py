"""One writer per output: an exclusive, process-lifetime lock beside a folder.

``OutputLock(folder)`` locks ``.<name>.lock`` in the folder's parent (beside, not inside, so
the folder itself can be swapped atomically) with ``fcntl.flock`` on POSIX or
``msvcrt.locking`` on Windows. The kernel drops the lock when the process dies, even by
``kill -9``, so a stale lock file never blocks a later run. The file records who holds it,
so a second writer is told "already being trained by process N since T".
Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from .errors import OutputError, os_error_reason

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class OutputBusyError(OutputError):
    """Another process holds the lock on this output."""


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


class OutputLock:
    """Exclusive lock on ``folder`` for as long as the ``with`` block (or until ``release``).

    Args:
        folder: the output folder to protect (it need not exist yet).
        activity: what the holder does, for the message a second process gets ("trained").
    """

    def __init__(self, folder: str | Path, activity: str = "written") -> None:
        self.folder = Path(folder)
        self.path = lock_path(self.folder)
        self.activity = activity
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        for _ in range(10):  # retry if the file we locked was removed by its previous holder meanwhile
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"cannot write beside {self.folder}: {os_error_reason(exc)}. "
                                  "Choose a writable output folder.") from exc
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputBusyError(f"{self.folder} is already being {self.activity} by {holder}; wait for that "
                                      f"run to end (or stop it), or choose another output folder.")
            if os.name == "nt" or _same_file(fd, self.path):
                self._fd = fd
                _write_holder(fd)
                return self
            _unlock(fd)
            os.close(fd)
        raise OutputBusyError(f"could not lock {self.path}: it keeps being replaced by other processes")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.name != "nt":
            self.path.unlink(missing_ok=True)  # while still locked: a waiting process re-checks the inode
        _unlock(fd)
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    data = (json.dumps(record) + "\n").encode()
    if os.name == "nt":  # pragma: no cover - byte 0 is the locked region; keep the record after it
        data = b" " + data
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, data)
        os.fsync(fd)
    except OSError:  # a full disk: the lock holds all the same, only its holder goes unnamed
        pass


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 1 if os.name == "nt" else 0, os.SEEK_SET)  # Windows locks byte 0 against reads
        record = json.loads(os.read(fd, 4096).decode("utf-8", "replace").strip() or "{}")
        return f"process {record['pid']} on {record['host']} since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
