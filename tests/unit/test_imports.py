"""The house's import rules, read from the source (DESIGN.md, rooms): no import circle, nothing imports
app.py but the commands, and an edge (ingress, delivery) never reaches into the other edge or back into
deciding (scheduling) or storing (spool). Every import counts: at module level, in a function, and under
TYPE_CHECKING (a circle there is still a circle in the design)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src"

# The modules that run a node: `postmux serve` (cli.py) and `postmux demo` (demo.py, which starts a node
# in front of its own loopback farm). Every other room is given its collaborators, never the App.
COMMANDS = {"postmux.cli", "postmux.demo"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "postmux").rglob("*.py"))}


def _imported(module: str, path: Path) -> Iterator[str]:
    """The postmux modules `module` imports, anywhere in its text."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from postmux.admin import control` imports the module postmux.admin.control.
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in _modules() else base


@cache
def imports() -> dict[str, frozenset[str]]:
    modules = _modules()
    return {
        name: frozenset(m for m in _imported(name, path) if m in modules and m != name)
        for name, path in modules.items()
    }


def _in(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def circles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each sorted: an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_rules_read_the_real_tree() -> None:
    graph = imports()
    assert "postmux.app" in graph and "postmux.ingress.acceptor" in graph
    assert "postmux.app" in graph["postmux.cli"]  # the reader sees imports inside functions too


def test_circles_are_found_where_there_are_some() -> None:
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_module_of_postmux_takes_part_in_an_import_circle() -> None:
    assert circles(imports()) == []


def test_nothing_imports_the_app_but_the_commands() -> None:
    importers = sorted(m for m, targets in imports().items() if "postmux.app" in targets)
    assert set(importers) <= COMMANDS, importers


@pytest.mark.parametrize(
    ("room", "never"),
    [
        pytest.param("postmux.ingress", "postmux.delivery", id="ingress-delivery"),
        pytest.param("postmux.ingress", "postmux.scheduling", id="ingress-scheduling"),
        pytest.param("postmux.admin", "postmux.app", id="admin-app"),
        pytest.param("postmux.delivery", "postmux.ingress", id="delivery-ingress"),
        pytest.param("postmux.delivery", "postmux.scheduling", id="delivery-scheduling"),
        pytest.param("postmux.delivery", "postmux.spool", id="delivery-spool"),
        pytest.param("postmux.balancing", "postmux.delivery", id="balancing-delivery"),
    ],
)
def test_no_room_imports_across_a_forbidden_edge(room: str, never: str) -> None:
    crossing = sorted(
        f"{module} -> {target}"
        for module, targets in imports().items()
        if _in(module, room)
        for target in targets
        if _in(target, never)
    )
    assert crossing == []
