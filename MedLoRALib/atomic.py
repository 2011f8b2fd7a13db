"""Atomic file writes: a file appears complete or not at all, with ordinary permissions.

The temporary file lives beside the target (same filesystem, so ``os.replace`` is atomic) and
keeps the target's suffix, because SimpleITK, PIL and matplotlib choose the format by suffix.
``tempfile.mkstemp`` alone would leave every output private (0600).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def replace_dir(staging: str | Path, folder: str | Path) -> None:
    """Rename a fully written ``staging`` folder to ``folder``.

    An existing ``folder`` is moved aside first and removed only after the swap, and put back
    if the swap fails, so readers see the old folder or the new one, never a half-written one.
    """
    staging, folder = Path(staging), Path(folder)
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
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
