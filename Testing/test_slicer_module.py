"""The Slicer module files: the .ui matches the code, and the module imports without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedLoRA" / "MedLoRA.py"
#: Not in Slicer's Python (its SuperBuild bundles numpy, scipy, SimpleITK, pydicom, Pillow, requests...):
#: none may be imported when the module loads.
HEAVY = {"torch", "timm", "peft", "torchvision", "psutil", "matplotlib", "sklearn", "tqdm", "monai", "safetensors"}
UI = ROOT / "Resources" / "UI" / "MedLoRA.ui"


def _ui_widgets() -> dict[str, ET.Element]:
    tree = ET.parse(UI)  # raises if the file is not well-formed XML
    assert tree.getroot().tag == "ui"
    return {w.get("name"): w for w in tree.iter("widget") if w.get("name")}


def test_ui_parses_and_has_every_widget_the_module_uses():
    widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the module looks up no widgets"
    missing = sorted(used - set(widgets))
    assert not missing, f"MedLoRA.py uses widgets missing from MedLoRA.ui: {missing}"


def test_ui_parameter_names_are_fields_of_the_parameter_node():
    source = MODULE.read_text()
    block = source[source.index("class MedLoRAParameterNode"):source.index("class MedLoRAWidget")]
    fields = set(re.findall(r"^    (\w+):", block, flags=re.M))
    bound = {p.find("string").text for p in ET.parse(UI).iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, f"unknown parameters in the .ui: {sorted(bound - fields)}"
    # Every MRML widget gets the scene from the top-level widget.
    receivers = {c.findtext("receiver") for c in ET.parse(UI).iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml_widgets = {name for name, w in _ui_widgets().items() if w.get("class", "").startswith("qMRML")} - {"MedLoRA"}
    assert mrml_widgets <= receivers


def test_resources_exist_where_the_module_looks_for_them():
    for relative in ("Icons/MedLoRA.png", "UI/MedLoRA.ui", "requirements.txt"):
        assert (ROOT / "Resources" / relative).is_file()
    assert (ROOT / "Resources" / "Icons" / "MedLoRA.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cmake = (ROOT / "MedLoRA" / "CMakeLists.txt").read_text()
    assert "MedLoRALib/*.py" in cmake and "Resources/UI/${MODULE_NAME}.ui" in cmake


def test_module_and_logic_import_with_slicer_core_alone_and_no_torch():
    """A fresh interpreter without MedLoRALib on its path, as in Slicer's developer mode."""
    code = f"""
import importlib.util, json, sys
sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]
sys.path.insert(0, {str(ROOT / 'MedLoRA')!r})
import MedLoRA
from MedLoRALib.slicer import (batch, crops, dependencies, engine_client, jobs, module_logic, mrml, process,
                               qt_process, reload, render, results, scoring, selftest, training, training_set)
scene = mrml.create_headless_scene()
logic = MedLoRA.MedLoRALogic(scene=scene.scene)
print(json.dumps({{
    "heavy": sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules),
    "lib": MedLoRA.LIB_ROOT,
    "logic": type(logic.moduleLogic.session).__name__,
    "python": logic.moduleLogic.session.engine.config.command()[1:4],
}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["lib"] == str(ROOT)
    assert report["logic"] == "ScoringSession"
    assert report["python"] == ["-m", "MedLoRALib", "serve"]


def test_reload_imports_fresh_consistent_library_modules_without_torch():
    code = """
import json, sys
import MedLoRALib.errors as errors_before
import MedLoRALib.slicer.scoring as logic_before
from MedLoRALib.slicer.reload import reload_library
names = reload_library()
import MedLoRALib.errors as errors_after
import MedLoRALib.slicer.scoring as logic_after
import MedLoRALib.slicer.results as results_after
print(json.dumps({
    "reloaded": "MedLoRALib.slicer.scoring" in names and "MedLoRALib.errors" in names,
    "fresh": logic_after is not logic_before and errors_after is not errors_before,
    "consistent": logic_after.MedLoRAError is errors_after.MedLoRAError
                  and logic_after.write_table is results_after.write_table,
    "heavy": sorted(m for m in ("torch", "timm", "peft") if m in sys.modules),
}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"reloaded": True, "fresh": True, "consistent": True,
                                                               "heavy": []}
    assert "importlib" in MODULE.read_text() and "import imp\n" not in MODULE.read_text()


def test_dependencies_lists_what_another_engine_python_lacks(tmp_path):
    from MedLoRALib.errors import MedLoRAError
    from MedLoRALib.slicer import dependencies

    assert dependencies.missing(sys.executable) == {"torch": [], "pip": [], "engine": []}
    assert dependencies.ensure(sys.executable, confirm=lambda text: pytest.fail(f"asked needlessly: {text}"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    bare = str(tmp_path / "bare" / "bin" / "python")
    needed = dependencies.missing(bare)
    assert needed["engine"] == ["torch", *dependencies.ENGINE_PROCESS.values()]
    with pytest.raises(MedLoRAError, match=r"lacks torch, timm>=1\.0\.8.*install them there"):
        dependencies.ensure(bare, confirm=lambda text: True)
    with pytest.raises(MedLoRAError, match="cannot run the engine's Python"):
        dependencies.missing(str(tmp_path / "no-such-python"))


def test_pip_requirements_never_touch_slicers_own_packages():
    from packaging.utils import canonicalize_name

    from MedLoRALib.slicer import dependencies

    specs = [*dependencies.SLICER_PROCESS.values(), *dependencies.ENGINE_PROCESS.values()]
    requirements = dependencies.pip_requirements(specs)
    assert [str(r) for r in requirements] == specs  # what Slicer's pip_ensure receives
    never = {canonicalize_name(name) for name in dependencies.NEVER_PIP}
    assert {canonicalize_name(r.name) for r in requirements}.isdisjoint(never)
    listed = (ROOT / "Resources" / "requirements.txt").read_text()
    assert not any(f"\n{name}" in listed.lower() for name in ("torch", "numpy", "simpleitk"))
    # the file users read and the list the module installs are the same list
    lines = {line.strip() for line in listed.splitlines() if line.strip() and not line.startswith("#")}
    assert lines == set(specs)
