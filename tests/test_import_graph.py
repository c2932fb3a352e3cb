"""The import graph of megamoe/, data_tools/ and launch/ has no cycle.

Every import statement counts, at module level or inside a function or an ``if TYPE_CHECKING``
block: an import hidden in a function still ties the two modules together, it only moves the
failure from import time to call time. Leaf modules (megamoe.errors, megamoe.config) stay at the
bottom this way.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megamoe", "data_tools", "launch")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imported(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that one import statement names (``from pkg import sub`` names pkg.sub)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                 for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:  # `import a.b.c` where c is an attribute: the longest module prefix
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: {target for node in ast.walk(ast.parse(path.read_text(), str(path)))
                   for target in imported(node, modules) if target != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_hidden_cycle() -> None:
    """The check can fail: two modules importing each other, one of them inside a function."""
    graph = import_graph()
    graph["megamoe.errors"] = graph["megamoe.errors"] | {"megamoe.train.loop"}
    assert any({"megamoe.errors", "megamoe.train.loop"} <= set(c) for c in cycles(graph))


def test_errors_and_config_are_leaves() -> None:
    """megamoe.errors imports nothing of ours; megamoe.config only itself and errors (no torch either)."""
    graph = import_graph()
    assert graph["megamoe.errors"] == set()
    config = {name for name in graph if name.startswith("megamoe.config")}
    assert all(graph[name] <= config | {"megamoe.errors"} for name in config), {n: graph[n] for n in config}
