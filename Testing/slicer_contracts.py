"""Reading ``docs/slicer-compat.md`` and finding what the module uses from Slicer, Qt and MRML.

Two halves, both used by ``test_slicer_compat.py``:

* ``read_tables`` parses the markdown tables of ``docs/slicer-compat.md`` (the one place where
  each Slicer rule and each Slicer / Qt / MRML call the module relies on is stated, with the
  Slicer version that introduced it and a file in Slicer's source).
* ``scan`` walks the syntax trees of ``MedLoRA/MedLoRA.py`` and ``MedLoRALib/slicer/*.py`` and
  returns every use of a Slicer, Qt, CTK or MRML name as a key to look up in that table.

How the scanner decides what is a Slicer call (the heuristic, precise where types are known):

1. Names imported from Slicer's world (``slicer``, ``qt``, ``ctk``, ``vtk``, ``vtkmodules``,
   ``PyTorchUtils``) are followed through attribute chains: ``slicer.util.errorDisplay``,
   ``slicer.modules.markups.logic``; a class in the chain (``qt.QFileDialog``,
   ``slicer.vtkMRMLScene``) restarts the key at the class: ``QFileDialog.getSaveFileName``.
2. Receivers whose class is known give exact keys ``Class.member`` for calls *and* attribute
   reads/writes (Qt properties): ``slicer.mrmlScene`` is a ``vtkMRMLScene``; ``self.ui.NAME`` has
   the class the ``.ui`` file gives widget NAME; a variable or ``self.x`` assigned from a
   Slicer class constructor or a function with a known return type has that class; Slicer's
   base classes provide ``self.parent`` and ``self.layout`` (``BASE_ATTRIBUTES``).
   A string signal in ``obj.connect("clicked()", f)`` becomes ``Class.clicked()``.
3. ``super().m()``, ``Base.m(self)`` and ``self.m()`` (m not defined in our code) inside a class
   with a Slicer base become ``Base.m`` for each Slicer base.
4. On receivers of unknown class, every method call whose name is PascalCase (VTK/MRML style:
   ``GetNthControlPointID``) or camelCase (Qt style: ``setMRMLScene``), is not defined
   anywhere in MedLoRA's own code and does not start with ``assert`` (unittest), becomes a
   loose key ``*.Name`` that passes when any table row has that member.
5. Receivers rooted in other imports (numpy, SimpleITK, the standard library, MedLoRALib)
   are not Slicer's: nothing below them is reported.

Blind spots (documented, not hidden): all-lowercase methods on receivers of unknown class
(``index.row()``, ``button.connect(...)``), objects passed in from outside (callback
arguments), and ``getattr`` with computed names.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPAT_DOC = REPO_ROOT / "docs" / "slicer-compat.md"
MODULE_FILE = REPO_ROOT / "MedLoRA" / "MedLoRA.py"
UI_FILE = REPO_ROOT / "Resources" / "UI" / "MedLoRA.ui"

# Top-level modules that belong to Slicer's application (or to slicer-core / VTK inside it).
SLICER_ROOTS = frozenset({"slicer", "qt", "ctk", "vtk", "vtkmodules", "PyTorchUtils", "slicer_core", "mrml"})
_CLASS_NAME = re.compile(r"^(vtk[A-Z]|q[A-Z]|Q[A-Z]|ctk[A-Z])")
_PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")
_CAMEL = re.compile(r"^[a-z][a-z0-9]*[A-Z][A-Za-z0-9]*$")
_SIGNAL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\(.*\)$")

# Objects Slicer hands every module, with their classes.
KNOWN_INSTANCES = {"slicer.mrmlScene": "vtkMRMLScene", "slicer.app": "qSlicerApplication"}
# Functions whose return class the scanner needs to follow further calls.
KNOWN_RETURNS = {
    "slicer.util.mainWindow": "qSlicerMainWindow",
    "slicer.modules.markups.logic": "vtkSlicerMarkupsLogic",
    "vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode": "vtkMRMLSubjectHierarchyNode",
    "qMRMLTableView.currentIndex": "QModelIndex",
    "qMRMLTableView.sortFilterProxyModel": "QSortFilterProxyModel",
    "QSortFilterProxyModel.mapToSource": "QModelIndex",
}
UI_ROOT = "<ui root>"  # slicer.util.loadUI returns the .ui file's top-level widget
UI_NAMESPACE = "<ui>"  # slicer.util.childWidgetVariables returns an object with one attribute per widget
# Attributes Slicer's scripted base classes set on ``self``
# (Base/Python/slicer/ScriptedLoadableModule.py; the layout: Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx).
BASE_ATTRIBUTES = {
    ("ScriptedLoadableModule", "parent"): "qSlicerScriptedLoadableModule",
    ("ScriptedLoadableModuleWidget", "parent"): "qSlicerScriptedLoadableModuleWidget",
    ("ScriptedLoadableModuleWidget", "layout"): "QVBoxLayout",
}


@dataclass(frozen=True)
class Use:
    """One use of a Slicer/Qt/MRML name: ``keys`` are alternatives (any one in the table will do)."""

    keys: tuple[str, ...]
    file: str
    line: int
    loose: bool = False  # the class of the receiver is unknown: match the member name only

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {' or '.join(self.keys)}{' (member name only)' if self.loose else ''}"


def member_of(key: str) -> str:
    """``vtkMRMLScene.AddNode`` → ``AddNode``; ``QPushButton.clicked()`` → ``clicked()``."""
    head = key.split("(", 1)[0]
    tail = key[len(head):]
    return head.rsplit(".", 1)[-1] + tail


def ui_widget_classes(ui_file: Path = UI_FILE) -> dict[str, str]:
    """Widget name → class in a Qt Designer file; the top-level widget under ``UI_ROOT`` too."""
    root = ET.parse(ui_file).getroot()
    classes = {w.get("name"): w.get("class") for w in root.iter("widget") if w.get("name")}
    top = root.find("widget")
    if top is not None:
        classes[UI_ROOT] = top.get("class")
    return classes


def ui_parameter_widgets(ui_file: Path = UI_FILE) -> dict[str, str]:
    """Parameter name (the ``SlicerParameterName`` dynamic property) → class of its widget."""
    found = {}
    for widget in ET.parse(ui_file).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.findtext("string")] = widget.get("class")
    return found


def defined_names(roots: list[Path]) -> set[str]:
    """Every function, method and class name MedLoRA's own code defines (not Slicer's).

    ``headless.py`` is left out: its stand-ins define Slicer's own names (``connectGui``, ...).
    """
    names = set()
    for path in _python_files(roots):
        if path.name == "headless.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


def _python_files(roots: list[Path]) -> list[Path]:
    files = []
    for root in roots:
        files.extend(sorted(root.rglob("*.py")) if root.is_dir() else [root])
    return files


# --- the scanner ----------------------------------------------------------------------------------
# A type is a tuple: ("module", dotted) | ("class", name) | ("instance", name) | ("ui",) | ("foreign",)


class _FileScanner:
    def __init__(self, path: Path, ours: set[str], ui_classes: dict[str, str], label: str):
        self.path, self.ours, self.ui_classes, self.label = path, ours, ui_classes, label
        self.tree = ast.parse(path.read_text())
        self.imports: dict[str, tuple[str, bool]] = {}  # name → (origin, is a class)
        self.foreign: set[str] = set()
        self.uses: list[Use] = []
        self._parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self._parents[child] = node
        self._read_imports()
        self._constructor_arguments: dict[str, dict[str, tuple]] = {}
        self._find_constructor_arguments()

    # imports ---------------------------------------------------------------------------------
    def _read_imports(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._bind(alias.asname or alias.name.split(".")[0],
                               alias.name if alias.asname else alias.name.split(".")[0], node, False)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    self._bind(alias.asname or alias.name, f"{node.module}.{alias.name}", node,
                               alias.name[:1].isupper() or bool(_CLASS_NAME.match(alias.name)), imported=True)
            elif isinstance(node, ast.ImportFrom):  # relative: MedLoRA's own
                for alias in node.names:
                    self.foreign.add(alias.asname or alias.name)

    def _bind(self, name: str, origin: str, node: ast.AST, is_class: bool, imported: bool = False) -> None:
        if origin.split(".")[0] in SLICER_ROOTS:
            self.imports[name] = (origin, is_class)  # a Slicer binding wins over a headless fallback
            self.foreign.discard(name)
            if imported:
                self.uses.append(Use((self._import_key(name),), self.label, node.lineno))
        elif name not in self.imports:
            self.foreign.add(name)

    def _import_key(self, name: str) -> str:
        """A class imported from Slicer is keyed by its name, anything else by where it comes from."""
        origin, is_class = self.imports[name]
        return origin.rsplit(".", 1)[-1] if is_class else origin

    # types -----------------------------------------------------------------------------------
    def type_of(self, node: ast.AST, scope: dict) -> tuple | None:
        if isinstance(node, ast.Name):
            if node.id in self.imports:
                return ("class" if self.imports[node.id][1] else "module", self._import_key(node.id))
            if node.id in self.foreign:
                return ("foreign",)
            return scope["locals"].get(node.id)
        if isinstance(node, ast.Attribute):
            return self._attribute_type(node, scope)
        if isinstance(node, ast.Call):
            func = self.type_of(node.func, scope)
            if func is None:
                return None
            kind = func[0]
            if kind == "class":
                return ("instance", func[1])
            if kind in ("module", "member"):
                returned = KNOWN_RETURNS.get(func[1])
                if func[1] == "slicer.util.loadUI":
                    returned = self.ui_classes.get(UI_ROOT)
                if func[1] == "slicer.util.childWidgetVariables":
                    return ("ui",)
                return ("instance", returned) if returned else None
            return ("foreign",) if kind == "foreign" else None
        if isinstance(node, ast.Subscript):
            return ("foreign",) if self.type_of(node.value, scope) == ("foreign",) else None
        return None

    def _attribute_type(self, node: ast.Attribute, scope: dict) -> tuple | None:
        attr = node.attr
        if isinstance(node.value, ast.Name) and node.value.id == "self" and scope.get("cls"):
            cls = scope["cls"]
            if attr == "ui" and cls["ui"]:
                return ("ui",)
            if attr in cls["attrs"]:
                return cls["attrs"][attr]
            for base in cls["bases"]:
                if (base, attr) in BASE_ATTRIBUTES:
                    return ("instance", BASE_ATTRIBUTES[(base, attr)])
            return None
        owner = self.type_of(node.value, scope)
        if owner is None:
            return None
        kind = owner[0]
        if kind == "foreign":
            return owner
        if kind == "module":
            chain = f"{owner[1]}.{attr}"
            if chain in KNOWN_INSTANCES:
                return ("instance", KNOWN_INSTANCES[chain])
            return ("class", attr) if _CLASS_NAME.match(attr) else ("module", chain)
        if kind == "ui":
            widget = self.ui_classes.get(attr)
            return ("instance", widget) if widget else ("instance", f"<widget {attr} missing from the .ui file>")
        if kind in ("class", "instance"):
            return ("member", f"{owner[1]}.{attr}")
        return None

    # scopes ----------------------------------------------------------------------------------
    def _class_info(self, node: ast.ClassDef) -> dict:
        bases = []
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in self.imports:
                bases.append(self._import_key(base.id))
        info = {"bases": bases, "attrs": {}, "ui": False, "name": node.name}
        methods = [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for _ in range(2):  # twice: an attribute may be typed from another one
            for method in methods:
                scope = self._locals(method, info)
                for item in ast.walk(method):
                    if isinstance(item, ast.Assign):
                        for target in item.targets:
                            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                                    and target.value.id == "self":
                                kind = self.type_of(item.value, scope)
                                if kind == ("ui",):
                                    info["ui"] = True
                                elif kind is not None and kind[0] in ("instance", "foreign"):
                                    info["attrs"][target.attr] = kind
        return info

    def _locals(self, func: ast.AST, cls: dict | None) -> dict:
        """Variables of one function with a known class: its assignments, and the arguments this file's
        own code passes to it as a constructor (``Handle(qt.QProcess())`` types ``Handle.__init__``'s)."""
        seeded = self._constructor_arguments.get((cls or {}).get("name"), {}) if func.name == "__init__" else {}
        scope = {"locals": dict(seeded), "cls": cls}
        assigns = sorted((n for n in ast.walk(func) if isinstance(n, (ast.Assign, ast.With, ast.For))),
                         key=lambda n: n.lineno)
        for item in assigns:
            if isinstance(item, ast.Assign):
                kind = self.type_of(item.value, scope)
                for target in item.targets:
                    if isinstance(target, ast.Name) and kind is not None and kind[0] in ("instance", "foreign", "ui"):
                        scope["locals"][target.id] = kind
            elif isinstance(item, ast.With):
                for w in item.items:
                    if isinstance(w.optional_vars, ast.Name):
                        kind = self.type_of(w.context_expr, scope)
                        if kind == ("foreign",):
                            scope["locals"][w.optional_vars.id] = kind
        return scope

    def _find_constructor_arguments(self) -> None:
        """Classes of the arguments passed to this file's own classes, by ``__init__`` parameter name."""
        classes = {c.name: c for c in ast.walk(self.tree) if isinstance(c, ast.ClassDef)}
        params = {}
        for name, cls in classes.items():
            init = next((m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"), None)
            if init is not None:
                params[name] = [a.arg for a in init.args.args[1:]]
        for func in ast.walk(self.tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            scope = self._locals(func, None)
            for call in ast.walk(func):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in params:
                    names = params[call.func.id]
                    bound = list(zip(names, call.args)) + [(k.arg, k.value) for k in call.keywords if k.arg]
                    for param, value in bound:
                        kind = self.type_of(value, scope)
                        if kind is not None and kind[0] == "instance":
                            self._constructor_arguments.setdefault(call.func.id, {})[param] = kind

    # the walk --------------------------------------------------------------------------------
    def scan(self) -> list[Use]:
        self._walk(self.tree, {"locals": {}, "cls": None})
        return self.uses

    def _walk(self, node: ast.AST, scope: dict) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                self._walk(child, {"locals": {}, "cls": self._class_info(child)})
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner = self._locals(child, scope["cls"]) if not isinstance(child, ast.Lambda) else scope
                self._walk(child, inner)
            else:
                self._visit(child, scope)
                self._walk(child, scope)

    def _add(self, keys, node: ast.AST, loose: bool = False) -> None:
        self.uses.append(Use(tuple(keys), self.label, getattr(node, "lineno", 0), loose))

    def _visit(self, node: ast.AST, scope: dict) -> None:
        if isinstance(node, ast.Attribute):
            self._visit_attribute(node, scope)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            self._visit_call(node, scope)

    def _visit_attribute(self, node: ast.Attribute, scope: dict) -> None:
        kind = self.type_of(node, scope)
        if kind is None or kind[0] in ("foreign", "ui"):
            return
        parent = self._parents.get(node)
        is_prefix = isinstance(parent, ast.Attribute) and parent.value is node
        if kind[0] == "member":
            if node.attr not in ("connect", "disconnect"):  # PythonQt's on every QObject; the signal is keyed
                self._add([kind[1]], node)
        elif kind[0] == "class":
            self._add([kind[1]], node)
        elif kind[0] == "module" and not is_prefix:
            self._add([kind[1]], node)
        elif kind[0] == "instance":
            owner = self.type_of(node.value, scope)
            if owner is not None and owner[0] == "module":
                self._add([f"{owner[1]}.{node.attr}"], node)  # slicer.mrmlScene, slicer.app
            elif isinstance(node.value, ast.Name) and node.value.id == "self" and scope.get("cls"):
                for base in scope["cls"]["bases"]:
                    if (base, node.attr) in BASE_ATTRIBUTES:
                        self._add([f"{base}.{node.attr}"], node)

    def _visit_call(self, node: ast.Call, scope: dict) -> None:
        func = node.func
        name = func.attr
        receiver = func.value
        if name in ("connect", "disconnect") and isinstance(receiver, ast.Attribute) and node.args \
                and not isinstance(node.args[0], ast.Constant) and self.type_of(receiver.value, scope) is None \
                and not self._rooted_in_foreign(receiver.value, scope):
            self._add([f"*.{receiver.attr}"], node, loose=True)  # obj.signal.connect(slot): a Qt signal
            return
        cls = scope.get("cls")
        signal = self._signal_argument(node)
        owner = self.type_of(receiver, scope)
        if owner is not None and owner[0] in ("instance", "class") and signal:
            self._add([f"{owner[1]}.{signal}"], node)
            return
        if owner is not None:
            return  # keyed by _visit_attribute (typed or foreign)
        bases = cls["bases"] if cls else []
        if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super":
            if bases:
                self._add([f"{base}.{name}" for base in bases], node)
            return
        if isinstance(receiver, ast.Name) and receiver.id == "self" and cls is not None:
            if bases and name not in self.ours and not name.startswith("assert") and not name.startswith("_"):
                self._add([f"{base}.{name}" for base in bases], node)
            return
        if signal:
            self._add([f"*.{signal}"], node, loose=True)
            return
        if self._rooted_in_foreign(receiver, scope):
            return
        if (_PASCAL.match(name) or _CAMEL.match(name)) and name not in self.ours and not name.startswith("assert"):
            self._add([f"*.{name}"], node, loose=True)

    @staticmethod
    def _signal_argument(node: ast.Call) -> str | None:
        if node.func.attr in ("connect", "disconnect") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _SIGNAL.match(node.args[0].value):
            return node.args[0].value
        return None

    def _rooted_in_foreign(self, node: ast.AST, scope: dict) -> bool:
        while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
            node = node.value if not isinstance(node, ast.Call) else node.func
        return isinstance(node, ast.Name) and self.type_of(node, scope) == ("foreign",)


def scan(files: list[Path], ours: set[str], ui_classes: dict[str, str], root: Path = REPO_ROOT) -> list[Use]:
    """Every Slicer/Qt/MRML use in ``files`` (see the module docstring for the rules)."""
    uses = []
    for path in files:
        label = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        uses.extend(_FileScanner(path, ours, ui_classes, label).scan())
    return uses


# --- the document ---------------------------------------------------------------------------------


@dataclass
class Table:
    heading: str
    columns: list[str]
    rows: list[dict[str, str]] = field(default_factory=list)


def read_tables(path: Path = COMPAT_DOC) -> dict[str, Table]:
    """Markdown tables by the ``##`` heading above them; cells stripped of backticks."""
    tables: dict[str, Table] = {}
    heading = ""
    current: Table | None = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            heading, current = line[3:].strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = tables[heading] = Table(heading, [c.lower() for c in cells])
            elif not all(set(c) <= set("-: ") for c in cells):
                current.rows.append(dict(zip(current.columns, (c.replace("`", "") for c in cells))))
        else:
            current = None if line.strip() == "" or not line.startswith("|") else current
    return tables


SOURCE = re.compile(r"^(?P<path>[\w./+-]+)\s*@\s*(?P<tag>v\d+\.\d+\.\d+|main)$")


# --- parameterNodeWrapper GUI connectors ------------------------------------------------------------
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py @ v5.4.0: each connector's canRepresent
# (widget class → the parameter types it can show). Later tags only add connectors.
_SCALAR_CONNECTORS = {
    "QCheckBox": (bool,), "QPushButton": (bool,), "QSlider": (int,), "QSpinBox": (int,),
    "QDoubleSpinBox": (float,), "ctkSliderWidget": (float,), "QLineEdit": (str,), "QTextEdit": (str,),
}


def gui_connector(widget_class: str, annotation) -> bool:
    """Whether Slicer 5.4 can bind a widget of this class to a parameter of this annotated type."""
    import enum
    import pathlib
    import typing

    from MedLoRALib.slicer import headless

    type_, annotations = headless._split(annotation)
    if widget_class in _SCALAR_CONNECTORS:
        return type_ in _SCALAR_CONNECTORS[widget_class]
    if widget_class == "QComboBox":  # QComboBoxToStringableConnector needs Choice; or an Enum
        if isinstance(type_, type) and issubclass(type_, enum.Enum):
            return True
        return type_ in (int, float, str, bool) and any(isinstance(a, headless.Choice) or type(a).__name__ == "Choice"
                                                         for a in annotations)
    if widget_class in ("ctkPathLineEdit", "ctkDirectoryButton"):
        return isinstance(type_, type) and issubclass(type_, pathlib.PurePath)
    if widget_class == "qMRMLNodeComboBox":  # util.isNodeOrUnionOfNodes
        members = typing.get_args(type_) if typing.get_origin(type_) is typing.Union else (type_,)
        return all(m is type(None) or headless._is_node_class(headless._split(m)[0]) for m in members) \
            and any(m is not type(None) for m in members)
    return False


# --- Slicer's own parameterNodeWrapper, loaded from its source ---------------------------------------


def load_slicers_parameter_node_wrapper(read_file, tag: str, folder: Path, monkeypatch):
    """Slicer's ``Base/Python/slicer/parameterNodeWrapper`` package at ``tag``, importable on slicer-core.

    The package imports ``qt`` and ``ctk`` and names a few ``slicer.q*`` widget classes at import
    time; only its GUI connectors use them, so empty stand-ins (scoped to the test by
    ``monkeypatch``) are enough for the serializers, validators and the wrapper itself.
    ``read_file(tag, path)`` returns a file of Slicer's repository.
    """
    import importlib
    import sys
    import types

    import slicer

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            stub = type(name, (), {})
            setattr(self, name, stub)
            return stub

    package = f"slicer_pnw_{tag.replace('.', '_')}"
    target = folder / package
    target.mkdir(parents=True, exist_ok=True)
    for name in ("__init__", "default", "guiConnectors", "guiCreation", "parameterInfo", "parameterPack",
                 "serializers", "types", "util", "validators", "wrapper"):
        text = read_file(tag, f"Base/Python/slicer/parameterNodeWrapper/{name}.py")
        if text is not None:
            (target / f"{name}.py").write_text(text)
    monkeypatch.setitem(sys.modules, "qt", _Stub("qt"))
    monkeypatch.setitem(sys.modules, "ctk", _Stub("ctk"))
    for name in ("qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView", "qMRMLSegmentSelectorWidget",
                 "qSlicerWidget", "qMRMLCheckableNodeComboBox"):
        if not hasattr(slicer, name):
            monkeypatch.setattr(slicer, name, type(name, (), {}), raising=False)
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module(package)


def is_guarded(path: Path, line: int, member: str) -> bool:
    """Whether the use of ``member`` on ``line`` runs only where Slicer has it.

    Guarded means: inside an ``if`` whose test names the member as a string (``hasattr(node,
    "Member")``, ``getattr(..., "Member", None)``) or compares a version, or inside a ``try`` that
    catches ``AttributeError``.
    """
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == member and node.lineno == line:
            current = node
            while current in parents:
                parent = parents[current]
                if isinstance(parent, ast.If) and current is not parent.test and _names_member(parent.test, member):
                    return True
                if isinstance(parent, ast.Try) and current in parent.body and any(
                        "AttributeError" in ast.dump(handler.type) for handler in parent.handlers if handler.type):
                    return True
                current = parent
    return False


def _names_member(test: ast.AST, member: str) -> bool:
    strings = {n.value for n in ast.walk(test) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
    return member in strings or any("version" in name.lower() for name in names)
