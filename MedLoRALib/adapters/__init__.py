"""Adapter packages: manifest (torch-free), weights save/load (torch), local store (torch-free).

``save_adapter`` and ``load_adapter`` are imported on first use, so importing this
package (as 3D Slicer does) never imports torch.
"""

from __future__ import annotations

from .manifest import FORMAT_VERSION, AdapterManifest, read_manifest

__all__ = ["FORMAT_VERSION", "AdapterManifest", "read_manifest", "save_adapter", "load_adapter", "AdapterStore"]


def __getattr__(name: str):
    if name in ("save_adapter", "load_adapter"):
        from . import package

        return getattr(package, name)
    if name == "AdapterStore":
        from .store import AdapterStore

        return AdapterStore
    raise AttributeError(name)
