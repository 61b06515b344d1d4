"""No iwm module is in an import cycle, counting imports inside functions too.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``
anywhere in a file (module level, inside functions, under ``TYPE_CHECKING``), relative
imports resolved, each edge going to the most specific iwm module it names; an edge to a
package is an edge to its ``__init__.py``. The lazy ``import iwm.api`` in
``iwm.__getattr__`` (which keeps the CLI's start fast) is no exception: it is an edge
``iwm -> iwm.api``, so nothing ``iwm.api`` depends on may import the ``iwm`` package.

Not an edge: Python running a package's ``__init__.py`` before any of its submodules.
That runs only the ``__init__``'s import-time code, and the last test keeps it from
importing anything of iwm but the leaf ``iwm.version``, so it cannot close a cycle.
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path
from typing import NamedTuple

SRC = Path(__file__).resolve().parents[1] / "src"


class Edge(NamedTuple):
    written: str
    line: int
    runs_on_import: bool


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "iwm").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _import_nodes(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import node with whether it runs when the module is imported (False inside a
    function or under ``if TYPE_CHECKING:``)."""
    found = []

    def visit(node: ast.AST, runs: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, runs))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, False)
            elif isinstance(child, ast.If) and ast.unparse(child.test) in (
                    "TYPE_CHECKING", "typing.TYPE_CHECKING"):
                visit(ast.Module(body=child.body, type_ignores=[]), False)
                visit(ast.Module(body=child.orelse, type_ignores=[]), runs)
            else:
                visit(child, runs)

    visit(tree, True)
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, list[Edge]]:
    """The iwm modules ``name`` imports, each with the imports that name it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: dict[str, list[Edge]] = {}
    for node, runs in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1]
                                + ([node.module] if node.module else []))
            # ``from pkg import sub`` names the submodule when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        for target in names:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(target, []).append(Edge(ast.unparse(node), node.lineno, runs))
    return edges


def _graph() -> dict[str, dict[str, list[Edge]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, dict]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    # The lazy import in iwm/__init__.py's __getattr__ is inside a function.
    assert any(not e.runs_on_import for e in _graph()["iwm"]["iwm.api"])
    (tmp_path / "b.py").write_text(
        "from . import a\n"
        "def f():\n"
        "    from .a import thing\n"
        "    import iwm.c.d\n"
        "if TYPE_CHECKING:\n"
        "    from iwm import c\n")
    modules = {"iwm": tmp_path / "__init__.py", "iwm.a": tmp_path / "a.py",
               "iwm.b": tmp_path / "b.py", "iwm.c": tmp_path / "c" / "__init__.py"}
    edges = _imports("iwm.b", tmp_path / "b.py", modules)
    assert {t: [e.runs_on_import for e in uses] for t, uses in edges.items()} == {
        "iwm.a": [True, False], "iwm.c": [False, False]}


def test_no_module_is_in_an_import_cycle():
    graph = _graph()
    cycle = _find_cycle(graph)
    if cycle:
        steps = [f"  {a} -> {b}   line {graph[a][b][0].line}: {graph[a][b][0].written}"
                 for a, b in itertools.pairwise(cycle)]
        raise AssertionError("import cycle:\n" + "\n".join(steps))


def test_the_config_is_the_bottom_floor():
    # Everything imports the config, so it imports nothing of iwm but the errors and the
    # factor vocabulary, which import nothing.
    graph = _graph()
    assert set(graph["iwm.config"]) == {"iwm.errors", "iwm.data.factors"}
    assert set(graph["iwm.errors"]) == set()
    assert set(graph["iwm.data.factors"]) == set()
    assert set(graph["iwm.version"]) == set()


def test_package_inits_import_only_the_version_when_imported():
    # Python runs a package's __init__ before any of its submodules; an import there would
    # add the edges this graph leaves out.
    graph = _graph()
    for name, path in _modules().items():
        if path.name == "__init__.py":
            run = {t for t, uses in graph[name].items() if any(e.runs_on_import for e in uses)}
            assert run <= {"iwm.version"}, (name, run)
