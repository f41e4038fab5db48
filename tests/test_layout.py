"""The house rules the folder tree promises (README, "Where things are"): no import circle, not even through imports
inside functions; engine/ never imports Ray or ray_jobs; the parts that decide and report import no Ray."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_RAY = ("engine", "ray_jobs.state", "ray_jobs.report")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("ray_jobs/**/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function: `from a.b import c` counts as a.b and a.b.c."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_through_others():
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert len(graph) > 50  # the whole tree was read
    assert _cycles(graph) == []


def test_engine_and_the_deciding_and_reporting_parts_import_no_ray():
    offenders = [
        (name, imported)
        for name, path in _modules().items()
        if name.startswith(NO_RAY)
        for imported in _imports(path)
        if imported == "ray" or imported.startswith("ray.") or (name.startswith("engine") and imported.startswith("ray_jobs"))
    ]
    assert offenders == []
