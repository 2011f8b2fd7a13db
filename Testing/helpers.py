"""Small helpers shared by several test modules (imported as ``helpers``: pytest puts Testing/ on sys.path)."""

from __future__ import annotations

import numpy as np


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3×3 rotation about the LPS x, y or z axis."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def tree_digest(*roots) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (files or folders), keyed by path.

    Bad-input tests take it before and after a command: equal digests prove that
    nothing MedLoRA did not write was changed, added or removed.
    """
    import hashlib
    from pathlib import Path

    digest = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest
