"""Atomic JSON writes for training records (torch-free)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from .progress import jsonable


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(jsonable(data), f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
