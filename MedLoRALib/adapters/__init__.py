"""Adapters: manifest, packages on disk and the local store (torch-free); weights in a model (torch).

Torch-free, for 3D Slicer's own process: ``manifest`` (what an adapter is), ``archive``
(reading and writing adapter folders and ``.zip`` packages safely), ``tensorfile`` (a
safetensors file is complete), ``store`` (the named adapters on this workstation),
``overwrite`` (what an explicit overwrite may replace in a folder: only the adapter's own files).
With torch: ``package`` (an adapter ↔ a ready ``NoduleClassifier``) and ``shared`` (many
adapters on one loaded backbone, for the engine): import those from their modules, so
importing this package never imports torch.
"""

from __future__ import annotations

from .archive import read_manifest
from .manifest import FORMAT_VERSION, AdapterManifest

__all__ = ["FORMAT_VERSION", "AdapterManifest", "read_manifest", "AdapterStore"]


def __getattr__(name: str):
    if name == "AdapterStore":
        from .store import AdapterStore

        return AdapterStore
    raise AttributeError(name)
