"""The code's shape: sub-packages by layer, and imports only ever go down (counting imports inside function bodies
and package ``__init__`` files), no import cycles, argparse only in the command layer."""
import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = ("clip4cir", "combiner")
# lowest first; a package may import its own modules and those of lower layers, never a higher or a sibling one
LAYERS = [
    ["clip4cir.core"],
    ["clip4cir.data"],
    ["clip4cir.models"],
    ["clip4cir.evaluation"],
    ["clip4cir.training", "clip4cir.retrieval"],
    ["clip4cir.serving", "combiner"],
    ["clip4cir.benchmarks"],
    ["clip4cir.commands"],
    ["clip4cir.__main__"],  # python -m clip4cir: the command line
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, anywhere in the file."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: {m for m in project_imports(path) if m in found and m != name} for name, path in found.items()}


def layer_of(module: str) -> tuple[int, str]:
    """(layer number, layer package) of a module; the top-level ``clip4cir`` package itself is layer -1."""
    for number, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return number, package
    if module == "clip4cir":
        return -1, "clip4cir"
    raise AssertionError(f"{module} is in no layer: put it in one of {[p for ps in LAYERS for p in ps]}")


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for module, imports in sorted(edges.items()):
        layer, package = layer_of(module)
        for imported in sorted(imports):
            other_layer, other_package = layer_of(imported)
            if other_package != package and other_layer >= layer:
                out.append(f"{module} (layer {layer}) imports {imported} (layer {other_layer})")
    return out


def test_every_module_is_in_a_layer_and_imports_only_lower_layers():
    edges = graph()
    assert len(edges) > 60
    assert violations(edges) == []


def test_the_layer_check_catches_an_upward_import():
    edges = graph()
    edges["clip4cir.data.images"] = edges["clip4cir.data.images"] | {"clip4cir.serving.ui"}
    edges["clip4cir.training.trainer"] = edges["clip4cir.training.trainer"] | {"clip4cir.retrieval.index"}
    found = violations(edges)
    assert any("clip4cir.data.images" in v and "serving.ui" in v for v in found)
    assert any("training.trainer" in v and "retrieval.index" in v for v in found)  # siblings: not allowed
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("clip4cir.misc")


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_argparse_only_in_the_command_layer():
    users = sorted(name for name, path in modules().items()
                   if "argparse" in {alias.name for node in ast.walk(ast.parse(path.read_text()))
                                     if isinstance(node, ast.Import) for alias in node.names}
                   and not name.startswith("clip4cir.commands"))
    assert users == []


def test_every_package_says_what_it_owns():
    for path in [p for package in PACKAGES for p in (REPO / package).rglob("__init__.py")]:
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring"


def test_library_messages_go_through_logging():
    """print is for the commands' and benchmarks' own output; the library logs."""
    printing = sorted(name for name, path in modules().items()
                      if not name.startswith(("clip4cir.commands", "clip4cir.benchmarks"))
                      and any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
                              for node in ast.walk(ast.parse(path.read_text()))))
    assert printing == []
