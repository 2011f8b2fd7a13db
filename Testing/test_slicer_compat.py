"""The module against Slicer's own contracts, as ``docs/slicer-compat.md`` states them.

Each test names the rule (``rule`` column of the document) it enforces. Rules come from Slicer's
source; where Slicer's repository is at hand (``MEDLORA_SLICER_SOURCE``, default
``../.mirror/Slicer+Slicer/repo`` beside the checkout) the document itself is checked against it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import slicer_contracts as contracts

import MedLoRALib.slicer.headless as headless

slicer = pytest.importorskip("slicer")

ROOT = contracts.REPO_ROOT
SLICER_FILES = ([contracts.MODULE_FILE] + sorted((ROOT / "MedLoRALib" / "slicer").glob("*.py"))
                + [ROOT / "MedLoRALib" / "explain" / "slicer_overlay.py"])  # the Slicer layer of explanations
SLICER_SOURCE = Path(os.environ.get("MEDLORA_SLICER_SOURCE", ROOT.parent / ".mirror" / "Slicer+Slicer" / "repo"))
SUPPORTED_TAGS = ("v5.4.0", "v5.6.0", "v5.8.0", "v5.10.0", "v5.12.0", "main")  # one per minor version
ALL_TAGS = ("v5.4.0", "v5.6.0", "v5.6.1", "v5.6.2", "v5.8.0", "v5.8.1", "v5.10.0", "v5.12.0", "v5.12.1", "v5.12.2",
            "v5.12.3", "main")  # patch releases too: a few calls arrived in one (5.6.1)
FORBIDDEN_AT_LOAD = ("torch", "timm", "peft", "psutil", "torchvision", "safetensors", "huggingface_hub")


@pytest.fixture(scope="module")
def tables() -> dict[str, contracts.Table]:
    return contracts.read_tables()


def _rule(tables, name: str) -> dict:
    rows = [r for r in tables["Rules"].rows if r["rule"] == name]
    assert len(rows) == 1, f"rule {name} must be stated exactly once in docs/slicer-compat.md"
    return rows[0]


# --- Slicer's source ------------------------------------------------------------------------------

_TREES: dict[str, list[str]] = {}
_FILES: dict[tuple[str, str], str | None] = {}
_CAT_FILE: list[subprocess.Popen] = []


def _git_blob(tag: str, path: str) -> str | None:
    """One file at a tag through one long-lived ``git cat-file --batch`` (hundreds of look-ups)."""
    if (tag, path) not in _FILES:
        if not _CAT_FILE:
            _CAT_FILE.append(subprocess.Popen(["git", "-C", str(SLICER_SOURCE), "cat-file", "--batch"],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        batch = _CAT_FILE[0]
        batch.stdin.write(f"{tag}:{path}\n".encode())
        batch.stdin.flush()
        header = batch.stdout.readline().split()
        if header[-1] == b"missing":
            _FILES[(tag, path)] = None
        else:
            _FILES[(tag, path)] = batch.stdout.read(int(header[2]) + 1)[:-1].decode("utf-8", "replace")
    return _FILES[(tag, path)]


@pytest.fixture(scope="module", autouse=True)
def _close_git_batch():
    yield
    while _CAT_FILE:
        batch = _CAT_FILE.pop()
        batch.stdin.close()
        batch.wait(timeout=10)


def _slicer_show(tag: str, path: str) -> str | None:
    """A file of Slicer's repository at a tag; found by its name when it moved (Markups MRML moved in 5.10)."""
    text = _git_blob(tag, path)
    if text is not None:
        return text
    if tag not in _TREES:
        _TREES[tag] = subprocess.run(["git", "-C", str(SLICER_SOURCE), "ls-tree", "-r", "--name-only", tag],
                                     capture_output=True, text=True).stdout.split()
    moved = [f for f in _TREES[tag] if f.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]]
    return _git_blob(tag, moved[0]) if len(moved) == 1 else None


needs_slicer_source = pytest.mark.skipif(not (SLICER_SOURCE / "HEAD").exists() and not (SLICER_SOURCE / ".git").exists(),
                                         reason=f"Slicer's repository not at {SLICER_SOURCE} (MEDLORA_SLICER_SOURCE)")


# --- the parameter node ---------------------------------------------------------------------------


class _Names(dict):
    """Names for evaluating the module's annotations: Slicer's classes are the real slicer-core ones,
    validators (``Choice``, ``WithinRange``) come from ``validators`` (the stand-in, or Slicer's own)."""

    def __init__(self, validators=headless, constants=None):
        super().__init__()
        self.validators, self.constants = validators, constants or {}

    def __missing__(self, name):
        import builtins

        for source in (self.constants, builtins, slicer, typing, self.validators):
            if isinstance(source, dict) and name in source:
                return source[name]
            if not isinstance(source, dict) and hasattr(source, name):
                return getattr(source, name)
        return None  # other module names inside annotations; not needed to learn the types


def _wrapped_class_node() -> ast.ClassDef:
    tree = ast.parse(contracts.MODULE_FILE.read_text())
    wrapped = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and any(
        (d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")) == "parameterNodeWrapper"
        for d in node.decorator_list)]
    assert len(wrapped) == 1, "MedLoRA.py must have one @parameterNodeWrapper class"
    return wrapped[0]


def _module_constants() -> dict:
    """The module file's top-level literal constants (``DEVICES = [...]``), for annotations that use them."""
    constants = {}
    for node in ast.parse(contracts.MODULE_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return constants


def _parameter_annotations(validators=headless) -> dict[str, object]:
    """Annotations of the module's ``@parameterNodeWrapper`` class, evaluated without importing the module."""
    names = _Names(validators, _module_constants())
    return {item.target.id: eval(compile(ast.Expression(item.annotation), "MedLoRA.py", "eval"), {}, names)
            for item in _wrapped_class_node().body if isinstance(item, ast.AnnAssign)}


def _parameter_defaults() -> dict[str, object]:
    return {item.target.id: ast.literal_eval(item.value) for item in _wrapped_class_node().body
            if isinstance(item, ast.AnnAssign) and item.value is not None}


def _node_classes(annotation) -> list[type]:
    type_, _ = headless._split(annotation)
    members = typing.get_args(type_) if typing.get_origin(type_) is typing.Union else (type_,)
    return [headless._split(m)[0] for m in members if headless._is_node_class(headless._split(m)[0])]


def test_every_annotated_node_class_instantiates(tables):
    """Rule wrapper-node-types: Slicer instantiates each annotated node class to learn its type."""
    _rule(tables, "wrapper-node-types")
    annotations = _parameter_annotations()
    node_parameters = {name: _node_classes(a) for name, a in annotations.items() if _node_classes(a)}
    assert node_parameters, "the parameter node has no node parameters: nothing checked"
    for name, classes in node_parameters.items():
        for cls in classes:
            try:
                node = cls()
            except TypeError as exc:
                pytest.fail(f"{name}: {cls.__name__} cannot be instantiated ({exc}); Slicer's parameterNodeWrapper "
                            "instantiates each annotated node class: annotate concrete classes")
            assert node.GetClassName() == cls.__name__
        assert headless.node_types(annotations[name]) == tuple(c.__name__ for c in classes)


def test_the_stand_in_refuses_an_abstract_node_class_as_slicer_does():
    with pytest.raises(TypeError):
        headless.node_types(slicer.vtkMRMLMarkupsNode)

    with pytest.raises(TypeError):
        @headless.parameterNodeWrapper
        class Abstract:
            markups: slicer.vtkMRMLMarkupsNode


def test_a_union_of_nodes_includes_none(tables):
    """Rule wrapper-union-none: Union[NodeA, NodeB] without None refuses the default None."""
    _rule(tables, "wrapper-union-none")
    for name, annotation in _parameter_annotations().items():
        type_, _ = headless._split(annotation)
        if typing.get_origin(type_) is typing.Union and _node_classes(annotation):
            assert type(None) in typing.get_args(type_), f"{name}: a Union of node classes needs None (Optional)"


def test_the_stand_in_wrapper_applies_slicers_union_and_default_rules():
    scene = _global_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    @headless.parameterNodeWrapper
    class WithoutNone:
        points: typing.Union[slicer.vtkMRMLMarkupsFiducialNode, slicer.vtkMRMLMarkupsROINode]

    with pytest.raises(TypeError):
        WithoutNone(node)

    @headless.parameterNodeWrapper
    class Pack:
        points: typing.Optional[typing.Union[slicer.vtkMRMLMarkupsFiducialNode, slicer.vtkMRMLMarkupsROINode]]
        volume: slicer.vtkMRMLScalarVolumeNode
        epochs: typing.Annotated[int, headless.WithinRange(1, 10)] = 3

    pack = Pack(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    assert pack.points is None and pack.volume is None and pack.epochs == 3
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    pack.points = roi
    assert pack.points is roi and pack.parameterNode.GetNodeReferenceID("points.1") == roi.GetID()
    with pytest.raises(TypeError):
        pack.volume = roi
    with pytest.raises(ValueError):
        pack.epochs = 11

    @headless.parameterNodeWrapper
    class BadDefault:
        epochs: typing.Annotated[int, headless.WithinRange(1, 10)]  # default 0 is out of range

    with pytest.raises(ValueError):
        BadDefault(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))


def _stored(node) -> list[tuple]:
    """What a parameter node holds: its parameters and node references."""
    params = [(n, node.GetParameter(n)) for n in sorted(node.GetParameterNames())]
    roles = [(r, node.GetNodeReferenceID(r)) for r in sorted(
        node.GetNthNodeReferenceRole(i) for i in range(node.GetNumberOfNodeReferenceRoles()))]
    return params + roles


def _outcome(action) -> str:
    """What an action gave: an exception's class, a node's class, a plain value, or the value's type."""
    try:
        value = action()
    except Exception as exc:  # compared between the two wrappers, whatever it is
        return type(exc).__name__
    if hasattr(value, "GetClassName"):
        return value.GetClassName()
    return repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__


def _exercise_parameter_node(wrapper, annotations: dict, defaults: dict) -> list:
    """Build the module's parameter node class with ``wrapper`` and put it through reads and writes."""
    holder = {}

    def create():
        holder["cls"] = wrapper(type("MedLoRAParameterNode", (), {"__annotations__": dict(annotations), **defaults}))
        return holder["cls"]

    scene = _global_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    record = [_outcome(create), _outcome(lambda: holder["cls"](node))]
    if "cls" not in holder or record[-1] != "MedLoRAParameterNode":
        return record
    pack = holder["cls"](node)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    record.append([(name, _outcome(lambda n=name: getattr(pack, n))) for name in annotations])
    record.append(_stored(node))
    for name, value in (("inputVolume", volume), ("inputMarkups", roi), ("inputMarkups", None),
                        ("resultsTable", volume), ("resultsTable", table), ("inputVolume", None),
                        ("epochs", 0), ("epochs", 5), ("rank", 65), ("device", "tpu"), ("device", "cpu")):
        if name in annotations:
            record.append((name, _outcome(lambda n=name, v=value: setattr(pack, n, v)),
                           _outcome(lambda n=name: getattr(pack, n))))
    record.append(_stored(node))
    return record


_PROBES = (  # annotations (as text, evaluated with each wrapper's own validators) where Slicer's rules bite
    "points: Union[vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode]",
    "points: Optional[Union[vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode]]",
    "volume: vtkMRMLScalarVolumeNode",
    "volume: Optional[vtkMRMLScalarVolumeNode]",
    "epochs: Annotated[int, WithinRange(1, 10)]",
    "epochs: Annotated[int, WithinRange(1, 10)] = 3",
    "device: Annotated[str, Choice(['cpu', 'cuda'])]",
    "name: str\nflag: bool\nscale: float = 0.5",
)


def _exercise_probe(wrappers, source: str) -> list:
    namespace = _Names(wrappers)
    body = ast.parse(source).body
    annotations = {item.target.id: eval(compile(ast.Expression(item.annotation), "probe", "eval"), {}, namespace)
                   for item in body}
    defaults = {item.target.id: ast.literal_eval(item.value) for item in body if item.value is not None}
    holder = {}

    def create():
        holder["cls"] = wrappers.parameterNodeWrapper(type("Probe", (), {"__annotations__": annotations, **defaults}))
        return holder["cls"]

    node = _global_scene().AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    record = [_outcome(create), _outcome(lambda: holder["cls"](node))]
    if record[-1] == "Probe":
        pack = holder["cls"](node)
        record += [_outcome(lambda n=name: getattr(pack, n)) for name in annotations] + [_stored(node)]
    return record


@needs_slicer_source
@pytest.mark.parametrize("tag", ("v5.4.0", "main"))
def test_the_module_parameter_node_behaves_the_same_on_slicers_own_wrapper(tag, tmp_path, monkeypatch):
    """Rules wrapper-*: the stand-in and Slicer's own parameterNodeWrapper (its source at the tag, run on
    slicer-core) give the same values, errors and stored parameters for the module's parameter node;
    and Slicer's own ``getNodeTypes`` accepts every node parameter."""
    real = contracts.load_slicers_parameter_node_wrapper(_slicer_show, tag, tmp_path, monkeypatch)
    defaults = _parameter_defaults()
    theirs = _exercise_parameter_node(real.parameterNodeWrapper, _parameter_annotations(real), defaults)
    ours = _exercise_parameter_node(headless.parameterNodeWrapper, _parameter_annotations(headless), defaults)
    for probe in _PROBES:
        assert _exercise_probe(headless, probe) == _exercise_probe(real, probe), f"differs from Slicer {tag}: {probe}"
    for name, annotation in _parameter_annotations(real).items():
        if _node_classes(annotation):
            assert _outcome(lambda a=annotation: real.getNodeTypes(a)) not in ("TypeError", "Exception"), \
                f"{name}: Slicer's getNodeTypes fails on {annotation!r}"
    assert ours == theirs


def test_every_gui_bound_parameter_has_a_connector_in_slicer_5_4(tables):
    """Rule wrapper-gui-connectors: each SlicerParameterName widget can represent its parameter's type."""
    _rule(tables, "wrapper-gui-connectors")
    annotations = _parameter_annotations()
    bound = contracts.ui_parameter_widgets()
    assert bound, "no SlicerParameterName in the .ui file"
    for name, widget in bound.items():
        assert name in annotations, f"the .ui binds {name!r}, which the parameter node does not have"
        assert contracts.gui_connector(widget, annotations[name]), \
            f"{name}: Slicer 5.4 has no connector from a {widget} to {annotations[name]!r}"
    for name, annotation in annotations.items():  # the premise of the stand-in's early node_types
        if _node_classes(annotation):
            assert bound.get(name) == "qMRMLNodeComboBox", f"{name}: node parameters are bound to a qMRMLNodeComboBox"


# --- the logic's constructor chain ----------------------------------------------------------------


def _global_scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return scene


def _load_module():
    spec = importlib.util.spec_from_file_location("MedLoRA_under_test", contracts.MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _built_logic(module, tmp_path):
    """The module's logic on the global scene, closed afterwards (its scene observers removed)."""
    from MedLoRALib.adapters.store import AdapterStore

    logic = module.MedLoRALogic(store=AdapterStore(tmp_path / "store"), workDir=str(tmp_path / "work"))
    try:
        yield logic
    finally:
        logic.close()


def test_the_stand_in_logic_calls_super_init_without_arguments(tables):
    """Rule logic-init-chain, on the stand-in itself: the next base gets no arguments."""
    _rule(tables, "logic-init-chain")

    class NeedsScene:
        def __init__(self, scene):
            self.scene = scene

    class Twice(headless.ScriptedLoadableModuleLogic, NeedsScene):
        def __init__(self):
            headless.ScriptedLoadableModuleLogic.__init__(self)
            NeedsScene.__init__(self, "scene")

    with pytest.raises(TypeError):
        Twice()
    assert headless.ScriptedLoadableModuleLogic().moduleName == "ScriptedLoadableModule"


def test_module_logic_builds_through_slicers_init_semantics(tables, tmp_path):
    """Rules logic-init-chain and logic-parameter-node on a real MRML scene."""
    _rule(tables, "logic-init-chain")
    _rule(tables, "logic-parameter-node")
    scene = _global_scene()
    module = _load_module()
    assert issubclass(module.MedLoRALogic, headless.ScriptedLoadableModuleLogic), "headless the stand-in is the base"
    with _built_logic(module, tmp_path) as logic:
        assert logic.moduleName == "MedLoRA"
        parameters = logic.getParameterNode()
        assert parameters.parameterNode.GetAttribute("ModuleName") == "MedLoRA"
        assert scene.GetSingletonNode("MedLoRA", "vtkMRMLScriptedModuleNode") is parameters.parameterNode
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        parameters.inputVolume = volume
        assert logic.getParameterNode().inputVolume is volume  # one singleton parameter node per scene
        points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        parameters.inputMarkups = points
        assert logic.getParameterNode().inputMarkups is points




@needs_slicer_source
@pytest.mark.parametrize("tag", SUPPORTED_TAGS)
def test_module_logic_builds_on_slicers_own_logic_class(tag, tmp_path, monkeypatch):
    """The same, with the ``ScriptedLoadableModuleLogic`` class read from Slicer's source at each tag."""
    real = _slicers_logic_class(tag)
    monkeypatch.setattr(headless, "ScriptedLoadableModuleLogic", real)
    _global_scene()
    module = _load_module()
    assert issubclass(module.MedLoRALogic, real)
    with _built_logic(module, tmp_path) as logic:
        assert logic.moduleName == "MedLoRA"
        assert logic.getParameterNode().parameterNode.GetAttribute("ModuleName") == "MedLoRA"


# --- every Slicer / Qt / MRML call is in the table ------------------------------------------------


def test_every_slicer_call_is_in_the_table(tables):
    """The scanner (see ``slicer_contracts``) against the ``call`` column."""
    calls = {row["call"] for row in tables["Calls"].rows}
    members = {contracts.member_of(c) for c in calls}
    ours = contracts.defined_names([ROOT / "MedLoRA", ROOT / "MedLoRALib"])
    uses = contracts.scan(SLICER_FILES, ours, contracts.ui_widget_classes())
    assert len(uses) > 50, "the scanner found almost nothing: it is broken"
    missing = [u for u in uses if not (any(contracts.member_of(k) in members for k in u.keys) if u.loose
                                       else any(k in calls for k in u.keys))]
    assert not missing, "Slicer/Qt/MRML uses not in docs/slicer-compat.md (add a row with Slicer's source, " \
        "or use a call Slicer has):\n" + "\n".join(sorted({str(u) for u in missing}))


FLOOR = "5.4"  # the oldest supported Slicer (README); calls newer than this need a guard


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_calls_newer_than_the_floor_are_guarded(tables):
    """A call Slicer added after the floor runs only behind ``hasattr`` / a version check / ``except AttributeError``."""
    newer = {contracts.member_of(r["call"]).split("(")[0]: r for r in tables["Calls"].rows
             if _version(r["since"]) > _version(FLOOR)}
    assert newer, "no call newer than the floor in the table: nothing checked"
    ours = contracts.defined_names([ROOT / "MedLoRA", ROOT / "MedLoRALib"])
    unguarded = []
    for use in contracts.scan(SLICER_FILES, ours, contracts.ui_widget_classes()):
        for key in use.keys:
            member = contracts.member_of(key).split("(")[0]
            if member in newer and not contracts.is_guarded(ROOT / use.file, use.line, member):
                unguarded.append(f"{use}: Slicer has it from {newer[member]['since']} ({newer[member]['source']}), "
                                 f"MedLoRA supports {FLOOR}")
    assert not unguarded, "\n".join(unguarded)


def test_the_guard_check_sees_hasattr_and_try(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f(node):\n"
                      "    node.SetUseColumnTitleAsColumnHeader(True)\n"
                      "    if hasattr(node, 'SetUseColumnTitleAsColumnHeader'):\n"
                      "        node.SetUseColumnTitleAsColumnHeader(True)\n"
                      "    try:\n"
                      "        node.SetUseColumnTitleAsColumnHeader(True)\n"
                      "    except AttributeError:\n"
                      "        pass\n")
    member = "SetUseColumnTitleAsColumnHeader"
    assert [contracts.is_guarded(source, line, member) for line in (2, 4, 6)] == [False, True, True]


def test_the_scanner_sees_typed_and_untyped_calls(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "import numpy as np\nimport qt\nimport slicer\n"
        "class W:\n"
        "    def setup(self):\n"
        "        self.ui = slicer.util.childWidgetVariables(slicer.util.loadUI('x'))\n"
        "        self.timer = qt.QTimer()\n"
        "        self.timer.setInterval(5)\n"
        "        self.ui.plotWidget.setMRMLPlotChartNode(None)\n"
        "        slicer.mrmlScene.GetFirstNodeByClass('x')\n"
        "        node.GetNthControlPointID(0)\n"
        "        np.zeros(3).GetSpacing()\n"
        "        self.ui.table.connect('clicked(QModelIndex)', print)\n")
    uses = contracts.scan([source], set(), {"plotWidget": "qMRMLPlotWidget", "table": "qMRMLTableView",
                                            contracts.UI_ROOT: "qMRMLWidget"}, tmp_path)
    keys = {k for u in uses for k in u.keys}
    assert {"QTimer.setInterval", "qMRMLPlotWidget.setMRMLPlotChartNode", "vtkMRMLScene.GetFirstNodeByClass",
            "*.GetNthControlPointID", "qMRMLTableView.clicked(QModelIndex)", "slicer.util.loadUI"} <= keys
    assert "*.GetSpacing" not in keys  # rooted in numpy: not Slicer's


def test_table_rows_are_stated_once_with_a_version_and_a_source(tables):
    for name, key in (("Rules", "rule"), ("Calls", "call"), ("Bundled Python packages", "import")):
        rows = tables[name].rows
        values = [r[key] for r in rows]
        assert len(values) == len(set(values)), f"{name}: a {key} is stated twice"
        for row in rows:
            assert row.get("source"), f"{name}: {row[key]} has no source"
    for row in tables["Calls"].rows + tables["Rules"].rows:
        assert _tag(row["since"]) in ALL_TAGS, row


def test_mrml_and_vtk_rows_exist_in_slicer_core(tables):
    """Each MRML / VTK ``Class.member`` row is there on the real classes (slicer-core, today's Slicer)."""
    import vtk

    checked = 0
    for row in tables["Calls"].rows:
        call = row["call"]
        cls, _, member = call.partition(".")
        owner = getattr(slicer, cls, None) or getattr(vtk, cls, None)
        if not cls.startswith("vtk") or owner is None:
            continue
        checked += 1
        if member and not member.endswith(")"):
            assert hasattr(owner, member.split("(")[0]), f"{call} is not in slicer-core's {cls}"
    assert checked > 40


def _declared(text: str, needle: str) -> bool:
    """The text, or for a VTK accessor (``GetName``, ``AutoWindowLevelOff``) the macro that makes it."""
    if needle in text:
        return True
    prop = re.sub(r"^(Get|Set)|(On|Off)$", "", needle)
    return prop != needle and re.search(rf"Macro\s*\(\s*{re.escape(prop)}\b", text) is not None


def _slicers_logic_class(tag: str):
    """``ScriptedLoadableModuleLogic`` as Slicer's source defines it at ``tag``, run on slicer-core."""
    tree = ast.parse(_slicer_show(tag, "Base/Python/slicer/ScriptedLoadableModule.py"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ScriptedLoadableModuleLogic")
    namespace = {"slicer": slicer}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), f"Slicer {tag}", "exec"), namespace)
    return namespace["ScriptedLoadableModuleLogic"]


def _parameter_nodes_made_by(base) -> list[tuple]:
    class ProbeLogic(base):
        pass

    scene = _global_scene()
    logic = ProbeLogic()
    first, again = logic.getParameterNode(), logic.getParameterNode()
    scene.Clear(0)  # a scene close removes the ModuleName attribute but keeps singletons
    first.SetAttribute("ModuleName", "")
    restored = logic.getParameterNode()
    logic.isSingletonParameterNode = False
    listed = logic.getAllParameterNodes()
    return [(logic.moduleName, first is again, restored is first, n.GetSingletonTag(), n.GetAttribute("ModuleName"),
             n.GetName(), len(listed)) for n in (first, restored)]


@needs_slicer_source
@pytest.mark.parametrize("tag", ("v5.4.0", "main"))
def test_the_stand_in_logic_makes_parameter_nodes_as_slicers_does(tag):
    """Rule logic-parameter-node: the stand-in and Slicer's own class give the same nodes on a real scene."""
    assert _parameter_nodes_made_by(headless.ScriptedLoadableModuleLogic) == \
        _parameter_nodes_made_by(_slicers_logic_class(tag))


def _tag(version: str) -> str:
    """``5.4`` → ``v5.4.0``; ``5.6.1`` → ``v5.6.1``."""
    return f"v{version}" if version.count(".") == 2 else f"v{version}.0"


@needs_slicer_source
def test_rows_match_slicers_source_at_every_supported_tag(tables):
    """Each rule and call: in its Slicer file from ``since`` to ``until`` (or main), not at the tag before."""
    problems = []
    checked = 0
    for table, key in (("Rules", "rule"), ("Calls", "call")):
        for row in tables[table].rows:
            match = contracts.SOURCE.match(row["source"])
            if not match:
                continue  # Qt, VTK, CTK or an extension: not in Slicer's repository
            needle = row.get("needle") or contracts.member_of(row[key]).split("(")[0]
            first = ALL_TAGS.index(_tag(row["since"]))
            last = ALL_TAGS.index(_tag(row["until"])) if row.get("until") else len(ALL_TAGS) - 1
            for tag in ALL_TAGS[first:last + 1]:
                checked += 1
                text = _slicer_show(tag, match["path"])
                if text is None or not _declared(text, needle):
                    problems.append(f"{row[key]}: {needle!r} not in {match['path']} at {tag}")
            for tag in ALL_TAGS[:first][-1:] + ALL_TAGS[last + 1:last + 2]:
                if _declared(_slicer_show(tag, match["path"]) or "", needle):
                    problems.append(f"{row[key]}: {needle!r} already/still in {match['path']} at {tag}")
    for row in tables["Bundled Python packages"].rows:
        match = contracts.SOURCE.match(row["source"])
        if match:
            if row["needle"] not in (_slicer_show(match["tag"], match["path"]) or ""):
                problems.append(f"{row['import']}: {row['needle']!r} not in {match['path']} at {match['tag']}")
    assert checked > 100
    assert not problems, "\n".join(problems)


def test_each_rule_names_a_test_that_exists(tables):
    tests = {node.name for node in ast.parse(Path(__file__).read_text()).body if isinstance(node, ast.FunctionDef)}
    for row in tables["Rules"].rows:
        assert row["test"] in tests, f"rule {row['rule']}: no test {row['test']}"


# --- what the module file imports ------------------------------------------------------------------

_IMPORT_PROBE = r"""
import importlib.abc, json, sys
allowed = set(json.loads(sys.argv[1]))
before = set(sys.modules)
refused = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in allowed and top not in sys.stdlib_module_names and not top.startswith("_sysconfigdata"):
            refused.append(name)
            raise ModuleNotFoundError(f"{name} is not bundled with Slicer", name=name)
        return None
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, sys.argv[2])
error = None
try:
    import MedLoRA
except BaseException as exc:
    error = f"{type(exc).__name__}: {exc}"
new = sorted({m.partition(".")[0] for m in set(sys.modules) - before})
def top_folder(path):  # site-packages/scipy/ndimage/_ni_label.so -> scipy
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1].split("/")[0].split(".")[0]
    return None
installed = sorted({top_folder(getattr(m, "__file__", None) or "") for n, m in list(sys.modules.items())
                    if n not in before} - {None})
files = sorted({getattr(m, "__file__", None) or "" for n, m in list(sys.modules.items())
                if n.startswith("MedLoRA")} - {""})
stdlib = sorted(m for m in new if m in sys.stdlib_module_names)
print(json.dumps({"error": error, "refused": refused, "new": new, "installed": installed, "files": files, "stdlib": stdlib}))
"""


def _allowed_top_level(tables) -> list[str]:
    bundled = [r["import"] for r in tables["Bundled Python packages"].rows]
    return bundled + ["MedLoRA", "MedLoRALib"]


@pytest.fixture(scope="module")
def import_report(tables) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, json.dumps(_allowed_top_level(tables)),
                          str(ROOT / "MedLoRA")], capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_module_file_imports_only_what_slicer_bundles(tables, import_report):
    """Rule module-imports: with only Slicer's bundled packages and slicer-core importable, the module loads."""
    _rule(tables, "module-imports")
    assert import_report["error"] is None, \
        f"importing MedLoRA.py failed: {import_report['error']} (refused: {import_report['refused']})"
    loaded = set(import_report["new"])
    assert not loaded & set(FORBIDDEN_AT_LOAD)
    installed = set(import_report["installed"])  # from site-packages: each must be one Slicer bundles
    assert installed <= set(_allowed_top_level(tables)), \
        f"loaded beyond what Slicer bundles: {sorted(installed - set(_allowed_top_level(tables)))}"
    assert "MedLoRALib" in loaded and "slicer" in installed


def _python39() -> str | None:
    for candidate in (os.environ.get("MEDLORA_PYTHON39"), shutil.which("python3.9"),
                      str(Path.home() / ".pyenv" / "versions" / "3.9.18" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() == "(3, 9)":
                return candidate
    return None


@pytest.mark.slow
def test_what_slicer_loads_parses_as_python_3_9(tables, import_report):
    """Rule python-3.9: Slicer 5.4-5.8 run Python 3.9; every MedLoRA file the module loads must parse there."""
    _rule(tables, "python-3.9")
    files = [f for f in import_report["files"] if f.endswith(".py")]
    assert str(contracts.MODULE_FILE) in files
    for path in files:
        ast.parse(Path(path).read_text(), path, feature_version=(3, 9))
    python39 = _python39()
    if python39 is None:
        pytest.skip("no Python 3.9 interpreter (MEDLORA_PYTHON39): checked with ast feature_version only")
    check = ("import ast, importlib.util, json, sys; files, stdlib = json.loads(sys.argv[1]); "
             "[ast.parse(open(f).read(), f) for f in files]; "
             "print(json.dumps([m for m in stdlib if importlib.util.find_spec(m) is None]))")
    out = subprocess.run([python39, "-c", check, json.dumps([files, import_report["stdlib"]])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [], "standard-library modules missing in Python 3.9"
