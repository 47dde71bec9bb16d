"""The package's import graph has no cycle: every ``import``/``from ... import`` of a ``geojepa`` module,
at module level or inside a function (where a cycle hides), is an edge; a cycle fails, naming its modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "geojepa"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in sorted((root / PACKAGE).rglob("*.py")):
        parts = p.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` names, or the package holding it (``from geojepa.x import y`` where y is not a
    module: geojepa.x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] == PACKAGE and (r := _resolve(t, modules)) and r != mod:
                    edges[mod].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), as a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles in geojepa/ (modules that import each other, directly or not): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_walker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_and_relative_imports_are_edges(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from geojepa.sub.b import g\n    return g\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n\ndef g():\n    return a\n")
    (pkg / "c.py").write_text("import numpy\nfrom geojepa.sub.a import f  # a name in a module: the module\n")
    edges = graph(tmp_path)
    assert edges["geojepa.sub.a"] == {"geojepa.sub.b"} and edges["geojepa.sub.b"] == {"geojepa.sub.a"}
    assert edges["geojepa.c"] == {"geojepa.sub.a"}
    assert cycles(edges) == [["geojepa.sub.a", "geojepa.sub.b"]]
