"""The import graph of MedLoRALib follows the layer order written in docs/architecture.md.

The doc's "Layers" table is the one place that says which module sits in which layer; this
test reads it, so the picture and the code cannot drift apart. A module may import modules
of its own layer and of layers below it, never above, and imports inside functions count
(a lazy import is still an arrow). A layer marked torch "no" imports no torch-family package
at load and no module of a torch layer at all, because 3D Slicer's process imports it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "MedLoRALib"
DOC = ROOT / "docs" / "architecture.md"
TORCH_FAMILY = {"torch", "timm", "peft", "safetensors", "torchvision"}

# Upward imports accepted on purpose, as (importer, imported) -> why. Keep this empty unless an
# arrow up is the lesser evil, and say why here.
LAZY_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("MedLoRALib.training.config", "MedLoRALib.models"):
        "PatchOptions.spec reads the backbone registry for the default --pixels, inside the function and only "
        "when the command line leaves --pixels out; Slicer's process builds command lines (cli_args), never specs",
}


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    prefixes: tuple[str, ...]
    torch: bool


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function or method: runs only when called


def read_layers(doc: Path = DOC) -> list[Layer]:
    """The rows of the table under ``## Layers`` in the doc, bottom layer first."""
    text = doc.read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "`" in line]
    layers = []
    for index, row in enumerate(rows):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        name, modules, torch = cells[0], cells[1], cells[2].lower()
        assert torch in ("yes", "no"), f"{DOC.name}: layer {name!r} says torch {torch!r}; write yes or no"
        layers.append(Layer(index + 1, name, tuple(re.findall(r"`([\w.]+)`", modules)), torch == "yes"))
    assert len(layers) >= 3, f"no layer table found under '## Layers' in {doc}"
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(LIB.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[Edge]:
    """MedLoRALib modules that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    lazy_lines = {node.lineno for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))}
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub when there is one.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == "MedLoRALib" or target.startswith("MedLoRALib."):
                edges.append(Edge(name, target, node.lineno, node.lineno in lazy_lines))
    return edges


def top_level_third_party(path: Path) -> set[str]:
    """Top-level packages imported when the module loads (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add((node.module or "").split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return found


class LayerMap:
    def __init__(self, layers: list[Layer]):
        self.layers = layers

    def layer_of(self, module: str) -> Layer | None:
        """The layer whose longest prefix matches (``x`` matches ``x`` and ``x.*``; ``__init__`` is the root)."""
        relative = module[len("MedLoRALib."):] if module.startswith("MedLoRALib.") else "__init__"
        best, length = None, -1
        for layer in self.layers:
            for prefix in layer.prefixes:
                if (relative == prefix or relative.startswith(prefix + ".")) and len(prefix) > length:
                    best, length = layer, len(prefix)
        return best


def _describe(edge: Edge, source: Layer, target: Layer) -> str:
    how = "lazily (inside a function)" if edge.lazy else "at load"
    return (f"{edge.importer} (layer {source.index} {source.name}) imports {edge.imported} "
            f"(layer {target.index} {target.name}) {how}, line {edge.line}")


def _graph():
    layers = read_layers()
    mapping = LayerMap(layers)
    modules = library_modules()
    return layers, mapping, modules


def test_every_module_has_a_layer_in_the_doc():
    _, mapping, modules = _graph()
    unknown = [name for name in modules if mapping.layer_of(name) is None]
    assert not unknown, (f"modules with no layer: {unknown}; add each (or its package) to the '## Layers' "
                         f"table of docs/architecture.md")


def test_no_import_points_up_a_layer():
    _, mapping, modules = _graph()
    known = set(modules)
    upward = []
    for name, path in modules.items():
        source = mapping.layer_of(name)
        if source is None:
            continue  # reported by test_every_module_has_a_layer_in_the_doc
        if path.name == "__init__.py":
            # Importing any submodule runs the package's __init__ first: it must sit as low
            # as the lowest module inside it.
            inside = [mapping.layer_of(m) for m in modules if m.startswith(name + ".")]
            source = min([source, *(layer for layer in inside if layer)], key=lambda layer: layer.index)
        for edge in imports_of(name, path, known):
            target = mapping.layer_of(edge.imported)
            if target is None or (edge.importer, edge.imported) in LAZY_EXCEPTIONS:
                continue
            if target.index > source.index:
                upward.append(_describe(edge, source, target))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_torch_free_layers_stay_torch_free():
    layers, mapping, modules = _graph()
    known = set(modules)
    problems = []
    for name, path in modules.items():
        source = mapping.layer_of(name)
        if source is None or source.torch:
            continue
        heavy = sorted(top_level_third_party(path) & TORCH_FAMILY)
        if heavy:
            problems.append(f"{name} (layer {source.index} {source.name}, torch-free) imports {heavy} at load")
        for edge in imports_of(name, path, known):
            target = mapping.layer_of(edge.imported)
            if target is not None and target.torch and (edge.importer, edge.imported) not in LAZY_EXCEPTIONS:
                problems.append(_describe(edge, source, target) + " — a torch layer")
    assert not problems, "torch-free layers reaching torch:\n" + "\n".join(problems)


def test_layer_map_reads_the_doc_and_catches_an_upward_arrow(tmp_path):
    """The checker itself: prefixes resolve to the longest match, unknown names stay unknown."""
    doc = tmp_path / "architecture.md"
    doc.write_text("# x\n\n## Layers\n\n| layer | modules | torch |\n|---|---|---|\n"
                   "| base | `__init__`, `errors` | no |\n| adapters | `adapters` | no |\n"
                   "| weights | `adapters.package` | yes |\n\n## Next\n| a | `b` | no |\n")
    layers = read_layers(doc)
    assert [(layer.name, layer.prefixes, layer.torch) for layer in layers] == [
        ("base", ("__init__", "errors"), False), ("adapters", ("adapters",), False),
        ("weights", ("adapters.package",), True)]
    mapping = LayerMap(layers)
    assert mapping.layer_of("MedLoRALib").name == "base"
    assert mapping.layer_of("MedLoRALib.adapters.store").name == "adapters"
    assert mapping.layer_of("MedLoRALib.adapters.package").name == "weights"
    assert mapping.layer_of("MedLoRALib.adapters_extra") is None
    assert mapping.layer_of("MedLoRALib.engine") is None
    module = tmp_path / "MedLoRALib" / "errors.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from .adapters import package\n")
    known = {"MedLoRALib.adapters", "MedLoRALib.adapters.package"}
    edges = imports_of("MedLoRALib.errors", module, known)
    assert edges == [Edge("MedLoRALib.errors", "MedLoRALib.adapters.package", 2, True)]
