"""Folders MedLoRA writes: a marker that says so, and the rule for what may be replaced.

Every output folder MedLoRA creates (a trained adapter, a training checkpoint, ...) holds a
small JSON file, ``.medlora-output``, naming its kind, the MedLoRA version and the time it was
made. ``--overwrite`` replaces only such folders: a folder without the marker — a DICOM study,
a home folder, the manifest's own folder — is somebody else's data and is never deleted.
Standard library only (Slicer's process imports it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from .atomic import write_text_atomic
from .errors import OutputError

MARKER_NAME = ".medlora-output"
MARKER_FORMAT = "medlora-output"
ADAPTER = "adapter"  # marker kinds: a trained or stored adapter folder
CHECKPOINT = "checkpoint"  # a training checkpoint folder


def marker_record(kind: str) -> dict:
    """The marker's content: what wrote the folder, and when."""
    from . import __version__

    return {"format": MARKER_FORMAT, "kind": kind, "version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_marker(folder: str | Path, kind: str) -> Path:
    """Mark ``folder`` (which must exist) as written by MedLoRA; returns the marker's path."""
    path = Path(folder) / MARKER_NAME
    write_text_atomic(path, json.dumps(marker_record(kind), indent=1) + "\n")
    return path


def read_marker(folder: str | Path) -> dict | None:
    """The marker of ``folder``, or ``None`` when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def protected_reason(folder: str | Path, inputs: Iterable[str | Path] = ()) -> str | None:
    """Why ``folder`` must never be deleted or replaced, or ``None`` if nothing forbids it.

    Forbidden: the file-system root, the current folder and its parents, a home folder and its
    parents, and any folder that is or holds one of ``inputs`` (the manifest, its images).
    """
    target = _resolved(folder)
    if target.parent == target:
        return "it is the root of the file system"
    cwd = _resolved(Path.cwd())
    if _is_within(cwd, target):
        return "it is the current folder" if target == cwd else f"it holds the current folder {cwd}"
    home = _resolved(Path.home())
    if _is_within(home, target):
        return "it is your home folder" if target == home else f"it holds your home folder {home}"
    for item in inputs:
        source = _resolved(item)
        if _is_within(source, target):
            return f"it holds {source}, an input of this run" if source != target else "it is an input of this run"
    return None


def check_replaceable(folder: str | Path, *, option: str, inputs: Iterable[str | Path] = (),
                      kind: str | None = None) -> None:
    """Raise OutputError unless an existing ``folder`` is one MedLoRA wrote and may replace.

    ``option`` names what the user gave (``--out``) so the message points at it; ``kind``, when
    given, must match the marker's kind (an adapter folder does not replace a checkpoint).
    An empty folder may be replaced: it holds nothing to lose.
    """
    folder = Path(folder)
    reason = protected_reason(folder, inputs)
    if reason:
        raise OutputError(f"{option} {folder}: MedLoRA will not replace this folder because {reason}. "
                          "Choose a new folder for the output.")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file, not a folder MedLoRA wrote; it is left alone. "
                          "Choose a new folder for the output.")
    if not any(folder.iterdir()):
        return  # an empty folder holds nothing to lose
    marker = read_marker(folder)
    if marker is None:
        raise OutputError(f"{option} {folder} was not written by MedLoRA (it has no {MARKER_NAME} marker), so "
                          "--overwrite will not delete it. Choose a new folder, or move its contents away yourself "
                          "(folders from MedLoRA versions without the marker must also be removed by hand).")
    if kind is not None and marker.get("kind") != kind:
        raise OutputError(f"{option} {folder} holds a MedLoRA {marker.get('kind')!r}, not a {kind!r}; "
                          "it is left alone. Choose another folder.")

