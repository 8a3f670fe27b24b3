"""The package's import graph: no cycles (counting imports inside functions too, so a knot cannot
hide behind a lazy import) and no module reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "se_export"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every se_export import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("se_export"):
                continue
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{target}.{n}" in known]
            found += [(f"{target}.{n}", [], node.lineno) for n in submodules]
            if len(submodules) < len(names):  # a name defined in the module (or package) itself
                found.append((target, [n for n in names if n not in submodules], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("se_export")]
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        for target, names, line in imports_of(name, path, known):
            if target in known and target != name:
                graph[name].add(target)
            private += [f"{name}:{line} takes {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__") and target in known]
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 30  # the walk found the package's modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert private == []


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("importer, text, expect", [
    ("se_export.api", "from .formats.checkpoint import load_checkpoint\n", "se_export.formats.checkpoint"),
    ("se_export.eval.validate", "from ..modeling import ops\n", "se_export.modeling.ops"),
    ("se_export.eval.validate", "from .stats import gap_closed\n", "se_export.eval.stats"),
])
def test_relative_imports_resolve_to_package_modules(tmp_path, importer, text, expect):
    fake = tmp_path / "module.py"
    fake.write_text(text)
    assert expect in {target for target, _, _ in imports_of(importer, fake, set(modules()))}
