"""No import cycle anywhere in tyr/: neither between modules nor between the packages of tyr/.

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import``, including
those inside functions, relative ones resolved), so a cycle hidden in a function-level import counts.
A test of the checker itself makes sure it finds a planted cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in sorted((root / "tyr").rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of tyr it imports}``. ``from a.b import c`` points at ``a.b.c`` when that is
    a module, else at ``a.b``; executing a parent package's ``__init__`` is not counted as an edge."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import tyr.a.b` reaches the deepest module that exists
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between the first-level packages / modules of tyr (``tyr.pruning``, ``tyr.export``)."""

    def top(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(top(m), set()).update(top(t) for t in targets if top(t) != top(m))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "tyr"
    for rel, text in {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/x.py": "from tyr.b import y\n",
        "b/__init__.py": "",
        "b/y.py": "def f():\n    from ..a.x import g\n",
        "c.py": "import tyr.a.x\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    g = import_graph(tmp_path)
    assert g["tyr.a.x"] == {"tyr.b.y"} and g["tyr.b.y"] == {"tyr.a.x"} and g["tyr.c"] == {"tyr.a.x"}
    assert cycles(g) == [["tyr.a.x", "tyr.b.y"]]
    assert cycles(package_graph(g)) == [["tyr.a", "tyr.b"]]


def test_no_import_cycle_in_tyr():
    g = import_graph(ROOT)
    assert len(g) > 40 and "tyr.pruning.local" in g["tyr.supernet.builder"]
    assert cycles(g) == [], "module import cycles"
    assert cycles(package_graph(g)) == [], "package import cycles"
