"""Atomic file writes (temp file in the same folder + os.replace), torch-free."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .progress import jsonable


def file_mode() -> int:
    """rw for whoever the umask allows (mkstemp alone would make files private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_path(path: Path) -> Path:
    """A fresh, empty temporary file beside ``path`` with ordinary permissions."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, file_mode())
    return Path(tmp)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(jsonable(data), f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
