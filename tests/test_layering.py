"""The package's layering: no subpackage (or top-level module) imports one that imports it back,
and no module imports one that imports it back. Every `stat_exp` import counts, also those inside
functions and under TYPE_CHECKING: a lazy import is still a dependency. Entry points
(`__main__.py`) are left out: nothing imports them, so they cannot close a cycle."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stat_exp"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the stat_exp modules it imports (a `from package import submodule` names the submodule)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py") if p.name != "__main__.py"}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def unit(module: str) -> str:
    """The subpackage or top-level module a module belongs to: stat_exp.prune.stat -> stat_exp.prune."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def units_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        out[unit(a)].update(unit(b) for b in targets if unit(b) != unit(a) and unit(b) != "stat_exp")
    return out


def _explain(graph: dict[str, set[str]], members: list[str], of=lambda m: m) -> str:
    """The imports that close a cycle, as `a -> b` lines."""
    inside = set(members)
    return "; ".join(sorted({f"{a} -> {b}" for a, bs in graph.items() for b in bs
                             if of(a) in inside and of(b) in inside and of(a) != of(b)}))


def test_no_subpackage_imports_one_that_imports_it_back():
    graph = import_graph()
    found = cycles(units_graph(graph))
    assert not found, "import cycles between subpackages: " + " | ".join(
        f"{' <-> '.join(c)} ({_explain(graph, c, unit)})" for c in found)


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles between modules: " + " | ".join(
        f"{' <-> '.join(c)} ({_explain(graph, c)})" for c in found)


def test_the_check_sees_a_cycle(tmp_path):
    """The checker itself: two modules that import each other are a cycle, at both levels."""
    pkg = tmp_path / "stat_exp"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from stat_exp.b.y import f\n")
    (pkg / "b" / "y.py").write_text("def f():\n    from stat_exp.a import x\n")
    graph = import_graph(pkg)
    assert cycles(units_graph(graph)) == [["stat_exp.a", "stat_exp.b"]]
    assert cycles(graph) == [["stat_exp.a.x", "stat_exp.b.y"]]
