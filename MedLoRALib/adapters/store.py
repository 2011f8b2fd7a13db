"""A folder of named adapters on this workstation (torch-free; 3D Slicer lists it).

Location: ``AdapterStore(root)``, else ``$MEDLORA_HOME/adapters``, else the platform's
user data folder (``~/.local/share/medlora/adapters`` on Linux — honouring
``$XDG_DATA_HOME`` —, ``~/Library/Application Support/MedLoRA/adapters`` on macOS,
``%LOCALAPPDATA%\\MedLoRA\\adapters`` on Windows). Each adapter is a sub-folder named
after the adapter. Every import and export verifies the files (SHA-256, complete
safetensors) and writes atomically; hidden ``.<name>.tmp-…`` leftovers of a killed
process are never listed, and are cleaned by the next change to the store.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from ..atomic import remove, staging_name, sweep_leftovers, writing
from ..errors import AdapterError
from ..locks import OutputLock
from .archive import is_adapter, read_checked, read_manifest, write_adapter
from .manifest import MANIFEST_NAME, AdapterManifest
from .overwrite import overwrite_in_place

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_store_root() -> Path:
    home = os.environ.get("MEDLORA_HOME")
    if home:
        return Path(home).expanduser() / "adapters"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "MedLoRA" / "adapters"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "MedLoRA" / "adapters"
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "medlora" / "adapters"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.lower().endswith(".zip"):
        raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' "
                           "(at most 100 characters, starting with a letter or digit)")
    return name


class AdapterStore:
    """Named adapters in one folder: list, info, import, export, delete, rename."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_root()

    def _dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        sweep_leftovers(self.root)  # puts back a folder a killed replace left aside (not on Linux)
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file())

    def list(self) -> list[AdapterManifest]:
        """Manifests of every readable adapter; unreadable ones are logged and skipped."""
        manifests = []
        for name in self.names():
            try:
                manifests.append(read_manifest(self.root / name))
            except AdapterError as exc:
                log.warning("skipping adapter %s: %s", name, exc)
        return manifests

    def path(self, name: str) -> Path:
        folder = self._dir(name)
        if not (folder / MANIFEST_NAME).is_file():
            known = ", ".join(self.names()) or "none"
            raise AdapterError(f"no adapter named {name!r} in {self.root} (available: {known}); "
                               "import one with `medlora adapters import PATH`")
        return folder

    def info(self, name: str) -> AdapterManifest:
        return read_manifest(self.path(name))

    def __contains__(self, name: str) -> bool:
        return _NAME.match(name or "") is not None and (self.root / name / MANIFEST_NAME).is_file()

    def import_(self, path: str | Path, name: str | None = None, overwrite: bool = False) -> str:
        """Copy an adapter folder or ``.zip`` into the store; returns its name.

        The files are always verified (SHA-256 and complete safetensors), ``overwrite`` or
        not: it only allows replacing a stored adapter of the same name.
        """
        adapter = read_checked(path)
        name = check_name(name or adapter.manifest.name)
        target = self._dir(name)
        if name in self and not overwrite:
            raise AdapterError(f"an adapter named {name!r} already exists in {self.root}; "
                               "choose another name (--name), replace it (--overwrite) or delete the old one")
        if (target.exists() or target.is_symlink()) and name not in self:
            raise AdapterError(f"{target} exists but is not a MedLoRA adapter; move it away first")
        sweep_leftovers(self.root)
        adapter.manifest.name = name
        write_adapter(adapter.manifest, adapter.contents, target)
        return name

    def export(self, name: str, dest: str | Path, overwrite: bool = False) -> Path:
        """Write a verified copy to ``dest`` (a ``.zip`` file or a folder).

        An existing plain folder receives the adapter inside it. An adapter already at the
        destination is replaced only with ``overwrite``, and anything else never: MedLoRA
        replaces only what has a valid MedLoRA manifest (what it wrote), and in an adapter folder
        only the adapter's own files (training reports and other files: ``overwrite.py``).
        """
        adapter = read_checked(self.path(name))
        dest = Path(dest).expanduser()
        if dest.is_dir() and dest.suffix.lower() != ".zip" and not (dest / MANIFEST_NAME).exists():
            dest = dest / name  # an existing plain folder: put the adapter inside it
        with OutputLock(dest):  # a training or merge writing dest holds it; what is there is read under it
            if dest.exists() or dest.is_symlink():
                if dest.is_symlink() or not is_adapter(dest):
                    raise AdapterError(f"{dest} exists and is not a MedLoRA adapter: MedLoRA will not replace it. "
                                       "Choose another destination.")
                if not overwrite:
                    raise AdapterError(f"{dest} already holds an adapter; pass --overwrite to replace it")
                if dest.is_dir() and overwrite_in_place(dest, adapter):  # reports or other files beside it
                    return dest
            sweep_leftovers(dest.parent)
            return write_adapter(adapter.manifest, adapter.contents, dest)

    def delete(self, name: str) -> None:
        folder = self.path(name)
        trash = staging_name(folder, "deleted")
        with writing(folder):
            os.replace(folder, trash)
        remove(trash)
        sweep_leftovers(self.root)

    def rename(self, old: str, new: str) -> None:
        folder = self.path(old)
        target = self._dir(new)
        if target.exists():
            raise AdapterError(f"cannot rename {old!r} to {new!r}: {target} already exists")
        manifest = read_manifest(folder)
        manifest.name = new
        with writing(target):
            os.replace(folder, target)
            tmp = staging_name(target / MANIFEST_NAME)
            tmp.write_text(manifest.to_json(), encoding="utf-8")
            os.replace(tmp, target / MANIFEST_NAME)


def resolve_adapter(name_or_path: str | Path, store: AdapterStore | None = None) -> Path:
    """An adapter given as a folder, a ``.zip`` or a name in the store."""
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        return candidate
    store = store or AdapterStore()
    if str(name_or_path) in store:
        return store.path(str(name_or_path))
    raise AdapterError(f"adapter {str(name_or_path)!r} is neither a folder or .zip on disk nor a name in "
                       f"the store {store.root} (available: {', '.join(store.names()) or 'none'})")
