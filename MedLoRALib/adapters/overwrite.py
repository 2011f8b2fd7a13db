"""What ``--overwrite`` may do to an adapter folder that is already there (torch-free).

An adapter folder can hold more than the adapter: ``medlora train`` writes its reports beside
the weights (``metrics.json`` and three plots, which exist nowhere else — the store keeps only
the adapter), and a user may have added files of their own. ``--overwrite`` replaces only the
adapter's own files (``manifest.json`` and the files it lists):

* the same weights (equal file hashes, the folder's verified): only ``manifest.json`` is
  rewritten, atomically; the reports still describe these weights and stay, as does the rest;
* other weights, and the folder holds nothing but the old adapter (and MedLoRA's marker): it is
  replaced as a whole, atomically (``archive.write_adapter``);
* other weights, and anything else in the folder: refused, naming those files. The reports
  would describe weights no longer there, and other files are not MedLoRA's to delete.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import AdapterError
from ..outputs import MARKER_NAME
from .archive import AdapterFiles, read_checked, read_manifest
from .manifest import MANIFEST_NAME, AdapterManifest

#: what ``medlora train`` writes beside the adapter (``training/output.py``)
TRAINING_REPORTS = ("metrics.json", "roc.png", "calibration.png", "training_curves.png")


def other_files(folder: Path, manifest: AdapterManifest) -> list[str]:
    """What an adapter folder holds beside the adapter's own files and MedLoRA's marker (relative, sorted):
    files, symlinks (never followed) and empty folders, which a whole replacement would delete too."""
    own = {MANIFEST_NAME, MARKER_NAME, *manifest.files}
    return sorted(rel for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                  if p.is_symlink() or not p.is_dir() or _empty_or_unreadable(p))
                  if rel not in own)


def _empty_or_unreadable(folder: Path) -> bool:
    """A folder whose files would not be listed: empty, or unreadable (counted as someone's, never deleted)."""
    try:
        return not any(folder.iterdir())
    except OSError:
        return True


def _same_weights(folder: Path, manifest: AdapterManifest) -> bool:
    try:
        return read_checked(folder).manifest.files == manifest.files
    except AdapterError:  # damaged or incomplete: not the same adapter
        return False


def overwrite_in_place(dest: Path, adapter: AdapterFiles) -> bool:
    """Apply ``--overwrite`` of the adapter folder ``dest`` by ``adapter`` where it must not be replaced whole.

    True: done (same weights, only ``manifest.json`` rewritten). False: ``dest`` holds only the
    old adapter's files and may be replaced as a whole. ``AdapterError`` when it holds other files
    and other weights are coming.
    """
    old = read_manifest(dest)
    others = other_files(dest, old)
    if not others:
        return False
    new = adapter.manifest
    if _same_weights(dest, new):
        new.validate(str(dest))
        write_text_atomic(dest / MANIFEST_NAME, new.to_json())
        return True
    reports = [name for name in others if name in TRAINING_REPORTS]
    foreign = [name for name in others if name not in TRAINING_REPORTS]
    held = ([f"the training reports of adapter {old.name!r} ({', '.join(reports)}), kept nowhere else"]
            if reports else []) + ([f"files MedLoRA did not write ({', '.join(foreign[:5])}"
                                    + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "") + ")"]
                                   if foreign else [])
    raise AdapterError(f"{dest} holds {' and '.join(held)} beside the adapter. --overwrite replaces only an "
                       f"adapter's own files, and {new.name!r} has other weights (version {new.version_id}, "
                       f"there {old.version_id}), so the folder is left as it is. Export to another destination, "
                       "or move those files away first.")
