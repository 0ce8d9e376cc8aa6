"""docs/ARCHITECTURE.md's rules, read from the source: imports point down the layers, no cycles.

Every import counts, the ones inside functions too: a lazy import hides a cycle from Python
at start-up, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level packages, highest layer first: a package may import only those after it.
LAYERS = ("localrun", "pipeline", "components", "vitpcm")
_FOLDERS = {"vitpcm": ROOT / "src" / "vitpcm"}


def _modules() -> dict[str, Path]:
    found = {}
    for top in LAYERS:
        folder = _FOLDERS.get(top, ROOT / top)
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that ``name`` (a module or a name inside one) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import submodule`` counts as the
    submodule, not the package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(filter(None, (_owner(a.name, modules) for a in node.names)))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = _owner(node.module, modules)
                for alias in node.names:
                    target = _owner(f"{node.module}.{alias.name}", modules)
                    edges.add(target if target and target != base else base)
        edges.discard(None)  # type: ignore[arg-type]
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_imports_point_down_the_layers() -> None:
    upward = [
        (module, target)
        for module, targets in import_graph().items()
        for target in targets
        if LAYERS.index(target.split(".")[0]) < LAYERS.index(module.split(".")[0])
    ]
    assert upward == []


def test_the_library_never_imports_kfp() -> None:
    offenders = []
    for path in _FOLDERS["vitpcm"].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "kfp" or n.startswith("kfp.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_checks_find_what_they_look_for() -> None:
    """The cycle finder on a known graph, so an empty answer above means something."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    graph = import_graph()
    assert "vitpcm.eval" in graph["components.evaluate"]  # imported inside the component
    assert "vitpcm.storage.core" in graph["vitpcm.storage.marker"]  # `from pkg import mod`
    assert "components" in graph["pipeline.steps"]
