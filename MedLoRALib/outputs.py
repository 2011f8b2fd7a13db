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
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .atomic import make_dir_public, replace_dir, write_text_atomic
from .errors import MedLoRAError, OutputError

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


# --- a folder written as a whole (crop, explain) ------------------------------------------------
@dataclass(frozen=True)
class FolderOutput:
    """An output folder a command writes as a whole, with an index file listing what it wrote.

    Its own files are those its index lists (the index is written last, so it exists only
    when a run finished) and the index itself; anything else in the folder is the user's.
    """

    command: str  # e.g. "crop"
    index_name: str  # e.g. "index.csv"
    listed: Callable[[Path], set[str] | None]  # the files an index in the folder lists (None: no index)
    contents: str = "files"  # what the folder holds, for messages ("images", "maps")
    folders: bool = False  # the index may list folders too (phantom: a DICOM series folder per case)

    def check(self, out: Path, overwrite: bool = False) -> None:
        """Refuse an output that is a file, the working folder, holds anything this command did not
        write, or (without ``overwrite``) holds an earlier run's output."""
        out, name = Path(os.path.abspath(out)), self.command
        if out == Path.cwd() or out in Path.cwd().parents:
            raise MedLoRAError(f"--out {out} is the folder you are working in (or holds it); {name} replaces its "
                               f"output folder as a whole, so name a new subfolder, e.g. --out {name}-output.")
        if out.exists() and not out.is_dir():
            raise MedLoRAError(f"--out {out} is a file; {name} writes a folder of {self.contents} and "
                               f"{self.index_name}. Name a new or empty folder.")
        entries = sorted(out.iterdir()) if out.is_dir() else []
        if not entries:
            return
        listed = self.listed(out)
        ours = set() if listed is None else listed | {self.index_name}
        foreign = [p.name for p in entries if p.is_symlink() or p.name not in ours
                   or not (p.is_file() or (self.folders and p.is_dir()))]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise MedLoRAError(f"--out {out} holds files {name} did not write ({shown}); {name} replaces its output "
                               "folder as a whole, so name a new or empty folder.")
        if not overwrite:
            raise MedLoRAError(f"--out {out} already holds {len(entries) - 1} file(s) and {self.index_name} from an "
                               "earlier run; pass --overwrite to replace them, or name another folder.")

    @contextmanager
    def writing(self, out: Path, overwrite: bool = False) -> Iterator[Path]:
        """A fresh staging folder to write into; on success it replaces ``out`` in one step.

        ``check`` runs before and again just before the swap, so a file put into ``out``
        meanwhile is not lost. On failure ``out`` is left as it was.
        """
        out = Path(os.path.abspath(out))
        self.check(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{self.command}-", dir=out.parent))
        make_dir_public(staging)
        try:
            yield staging
            self.check(out, overwrite)
            replace_dir(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
