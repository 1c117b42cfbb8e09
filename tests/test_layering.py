"""The package's layers: imports point down only, and no module imports another in a cycle.

Layers, bottom to top (``atso_fast/CONTRACTS.md``)::

    kernels  <  io  <  package, runtimes, archive, datasets  <  engine
      <  ray_engine, bench, train  <  cli  <  __main__

Every ``import`` statement counts, top-level or inside a function: a function-level import is not
a way around a cycle (the only function-level imports allowed are of optional heavy third-party
packages, which this test does not see).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "atso_fast"

RANKS = {
    "_C": 0,
    "kernels": 0,
    "io": 1,
    "progress": 1,
    "cliargs": 1,
    "package": 2,
    "runtimes": 2,
    "archive": 2,
    "engine": 3,
    "datasets": 2,
    "ray_engine": 4,
    "bench": 4,
    "train": 4,
    "cli": 5,
    "__main__": 6,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``atso_fast...`` module a file imports (``from atso_fast.x import y`` gives
    ``atso_fast.x.y`` when that is a module, else ``atso_fast.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("atso_fast")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("atso_fast"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "atso_fast"))
def test_imports_point_down(name):
    here = top(name)
    assert here in RANKS, f"{name}: add its layer to RANKS"
    for target in imported_modules(MODULES[name]):
        there = top(target)
        if target == "atso_fast" or there == here:
            continue
        assert there in RANKS, f"{name} imports {target}, which has no layer"
        assert RANKS[there] < RANKS[here], (
            f"{name} (layer {RANKS[here]}) imports {target} (layer {RANKS[there]}): arrows must point down"
        )


def test_no_import_cycles():
    graph = {name: {t for t in imported_modules(path) if t in MODULES and t != name} for name, path in MODULES.items()}
    graph["atso_fast"] = set()  # the top package loads its exports lazily
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
