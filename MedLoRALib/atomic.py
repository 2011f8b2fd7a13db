"""Files at the bottom layer: SHA-256 of files, and atomic writes and replaces of files and folders.

A file or folder appears complete or not at all. Temporary files live beside the target
(same filesystem, so ``os.replace`` is atomic) and keep its suffix, because SimpleITK, PIL
and matplotlib choose the format by suffix; ``tempfile.mkstemp`` alone would leave every
output private (0600). Staging folders carry the writing process's id in their hidden name,
so a leftover of a killed process is recognised and cleaned (``sweep_leftovers``).

A write that fails for a reason the user can act on (full disk, read-only folder, no
permission) raises ``OutputError`` — a ``MedLoRAError`` and an ``OSError`` — naming the path
and leaving the previous file or folder intact. Standard library only: 3D Slicer imports it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import OutputError, explain_os_error

_CHUNK = 1 << 20
# Hidden staging names: .<target>.<kind>-<pid>-<token>
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old|deleted)-(?P<pid>\d+)-[0-9a-f]{8}$")


# --- hashes -----------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (backbone weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- errors -----------------------------------------------------------------------------------

def output_error(path: str | Path, exc: OSError) -> OutputError:
    """A user-facing error for a failed write of ``path``; the previous content is untouched."""
    if isinstance(exc, OutputError):
        return exc
    error = explain_os_error(exc, path)
    error.args = (f"{error}. Nothing was replaced: any previous file there is unchanged.",)
    error.errno = exc.errno  # for code that tests it; str(error) stays the message
    return error


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into ``OutputError``."""
    try:
        yield
    except OSError as exc:
        raise output_error(path, exc) from exc


# --- files ------------------------------------------------------------------------------------

def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """rw for whoever the umask allows."""
    return 0o666 & ~_umask()


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def temp_path(path: Path, suffix: str | None = None) -> Path:
    """A fresh, empty temporary file beside ``path`` with ordinary permissions."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=_suffix(path) if suffix is None else suffix)
    os.close(fd)
    os.chmod(tmp, file_mode())
    return Path(tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, *, indent: int = 1) -> Path:
    """Write plain JSON (no NaN: convert first, e.g. ``training.progress.jsonable``), synced to disk."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


# --- folders ----------------------------------------------------------------------------------

def staging_name(target: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``target`` (``.<name>.<kind>-<pid>-<token>``) for staging or setting aside."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (musl, old glibc)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_dir(staging: str | Path, folder: str | Path) -> None:
    """Put a fully written ``staging`` folder in place of ``folder``.

    On Linux the two are swapped in one step, so ``folder`` is the old or the new one at
    every instant, even if the process is killed. Elsewhere the old folder is moved aside
    (``.<name>.old-<pid>-…``) first and removed after the swap, or put back if the swap
    fails; a kill between the two renames leaves it aside, and ``sweep_leftovers`` puts it back.
    """
    staging, folder = Path(staging), Path(folder)
    with writing(folder):
        if folder.is_dir() and _exchange(staging, folder):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
            return
        old = staging_name(folder, "old")
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(staging, folder)
        except OSError:
            if old.exists():
                os.replace(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)


def make_dir_public(folder: str | Path) -> None:
    """Give a ``tempfile.mkdtemp`` staging folder (0700) the permissions of an ordinary folder."""
    os.chmod(folder, 0o777 & ~_umask())


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it is there; best effort (cleanup must not mask an error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    with suppress(OSError):  # e.g. EROFS even for a name that does not exist
        path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a staging or set-aside name made by ``staging_name``."""
    return _LEFTOVER.match(name) is not None


def sweep_leftovers(folder: str | Path) -> list[str]:
    """Clean what killed processes left in ``folder``; returns the names handled.

    Staging folders/files and deleted trees are removed; a folder set aside by
    ``replace_dir`` goes back to its name if nothing took its place, else it is removed.
    Entries of running processes are left alone, and so is every name ``staging_name`` does not
    make; failures (read-only folder) are ignored.
    """
    folder = Path(folder)
    handled = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return handled
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None or _running(int(match["pid"])):
            continue
        try:
            target = folder / match["target"]
            if match["kind"] == "old" and not target.exists():
                os.replace(entry, target)
            else:
                remove(entry)
        except OSError:
            continue
        handled.append(entry.name)
    return handled
