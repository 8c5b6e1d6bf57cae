"""Imports among ``nclab`` modules point down: no circle, lazy imports included.

The graph has an edge ``a -> b`` when module ``nclab.a`` imports ``nclab.b`` anywhere in its source,
at module level or inside a function (a lazy import hides a circle from Python, not from the design).
Every strongly connected component of more than one module is a circle, and the test names it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nclab"


def _target(node: ast.ImportFrom, name: str | None, modules: set[str]) -> str | None:
    """The nclab module an ``ImportFrom`` names (``from .x import y`` / ``from nclab.x import y``;
    ``from nclab import x`` and ``from . import x`` name module ``x``), or None."""
    base = node.module or ""
    if node.level > 1:
        return None
    if node.level == 0:
        if base != "nclab" and not base.startswith("nclab."):
            return None
        base = base[len("nclab."):] if base.startswith("nclab.") else ""
    if not base:
        return name if name in modules else None
    head = base.split(".")[0]
    return head if head in modules else None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` over ``package/*.py``, every import statement counted."""
    files = {p.stem: p for p in sorted(package.glob("*.py")) if p.stem != "__init__"}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "nclab" and len(parts) > 1 and parts[1] in modules:
                        graph[mod].add(parts[1])
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    t = _target(node, alias.name, modules)
                    if t is not None:
                        graph[mod].add(t)
        graph[mod].discard(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_detector_finds_a_circle_in_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_detector_reads_lazy_and_relative_imports(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (tmp_path / "high.py").write_text("from nclab.low import f\nfrom nclab import low\n")
    graph = import_graph(tmp_path)
    assert graph == {"low": {"high"}, "high": {"low"}}
    assert cycles(graph) == [["high", "low"]]


def test_nclab_imports_hold_no_circle():
    graph = import_graph()
    assert len(graph) > 10  # the package's modules were read
    found = cycles(graph)
    assert not found, "import circles among nclab modules (move the shared helper down): " + "; ".join(
        " <-> ".join(c) for c in found)
