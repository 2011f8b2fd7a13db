"""Reload MedLoRALib's code in a running Slicer (the module's Reload button, developer mode).

Slicer's reload re-runs ``MedLoRA.py`` only; the library it imports would stay as first
loaded. Reloading modules one by one with ``importlib.reload`` leaves stale references
whenever a module is reloaded before one it imports from, so every loaded MedLoRALib
module is dropped and imported again: Python's import order then puts each dependency
first. Only modules that were loaded are imported again, so this never pulls torch into
Slicer's process.
"""

from __future__ import annotations

import importlib
import sys

PACKAGE = "MedLoRALib"


def reload_library(package: str = PACKAGE) -> list[str]:
    """Import every loaded module of ``package`` afresh; returns their names."""
    importlib.invalidate_caches()
    names = sorted(name for name in sys.modules if name == package or name.startswith(package + "."))
    for name in names:
        del sys.modules[name]
    for name in names:
        importlib.import_module(name)
    return names
