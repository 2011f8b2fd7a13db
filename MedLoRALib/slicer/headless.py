"""What ``MedLoRA.py`` uses from Slicer's application when only ``slicer-core`` is installed.

``slicer-core`` has MRML and the module logics but no Qt, no ``slicer.app`` and no
``ScriptedLoadableModule`` base classes. With these plain bases the module file imports
and its logic runs (CI, scripts); the widget needs Qt and refuses to start without it.
"""

from __future__ import annotations

import unittest


def tr(text: str) -> str:
    """Slicer's translation function, untranslated."""
    return text


def parameterNodeWrapper(cls):  # noqa: N802 - Slicer's name
    """Parameter nodes need Slicer's application; headless the class stays a plain class."""
    return cls


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        raise RuntimeError("the MedLoRA widget needs 3D Slicer's application (Qt); use MedLoRALogic headless")


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.parent = parent

    def getParameterNode(self):  # noqa: N802 - Slicer's name
        raise RuntimeError("parameter nodes need 3D Slicer's application")


ScriptedLoadableModuleTest = unittest.TestCase
