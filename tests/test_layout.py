"""The rooms of the code and what each may import (the README's layout table): data flows one way,
`inference → spatialdb → dashboard`, and no module imports itself back through another. Read from
the source (every import, those inside functions too), so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inference", "spatialdb", "dashboard")
ROOMS = ("store", "features", "interop", "nic", "pipeline", "scale", "cli")

#: room -> what it must not import (a module or package name and everything under it)
FORBIDDEN = {
    "inference": {"spatialdb", "dashboard"},
    "spatialdb": {"dashboard"},
    "spatialdb.store": {"inference"} | {f"spatialdb.{r}" for r in ROOMS if r != "store"},
    "spatialdb.features": {"inference"}
    | {f"spatialdb.{r}" for r in ("interop", "nic", "pipeline", "scale", "cli")},
    "spatialdb.interop": {"inference"}
    | {f"spatialdb.{r}" for r in ("features", "nic", "pipeline", "scale", "cli")},
    "spatialdb.nic": {"inference"}
    | {f"spatialdb.{r}" for r in ("features", "interop", "pipeline", "scale", "cli")},
    "spatialdb.pipeline": {"spatialdb.scale", "spatialdb.cli"},
    "spatialdb.scale": {"spatialdb.cli"},
    "dashboard": {
        "spatialdb.cli",
        "spatialdb.pipeline",
        "spatialdb.scale",
        "spatialdb.store.loader",
    },
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n in known}


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_every_room_imports_only_what_it_may(graph):
    broken = [
        f"{module} imports {target} ({room} must not import {prefix})"
        for room, forbidden in FORBIDDEN.items()
        for module, targets in graph.items()
        if under(module, room)
        for target in targets
        for prefix in forbidden
        if under(target, prefix)
    ]
    assert broken == []


def test_no_module_imports_itself_back(graph):
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_rules_see_the_rooms(graph):
    """The rules name rooms that exist, and the checks see a known import (they can fail)."""
    for room in FORBIDDEN:
        assert any(under(module, room) for module in graph), room
    assert "spatialdb.pipeline.ingest" in graph["spatialdb.scale.dask_cluster"]
    assert "inference.slide" in graph["inference.compress"]
