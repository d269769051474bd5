"""The shape of the code: arrows point inward, routes stay thin, no import cycles.

Read from the source (every import, those inside functions too), so a lazy import cannot hide a
cycle or a wrong-way arrow."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("mailqueue", "api", "workflows", "activities", "devstack")
OUTER = ("api", "workflows", "activities", "worker", "devstack")  # what the domain package must never import


def _modules() -> dict[str, Path]:
    found = {"worker": ROOT / "worker.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> Iterator[str]:
    """The project modules `name` imports, anywhere in the file."""
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: the project imports absolutely (this check reads only such imports)"
            base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: set(_imports(name)) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return groups


def test_the_layout_is_read_whole() -> None:
    # The checks below are only as good as this reading: it must see the modules and their imports.
    assert {"mailqueue.contracts", "api.routes.emails", "api.services.emails", "workflows.send_email", "worker"} <= set(MODULES)
    assert "api.services.emails" in GRAPH["api.routes.emails"] and "mailqueue.contracts" in GRAPH["workflows.send_email"]
    assert "activities.send" in GRAPH["workflows.send_email"]  # an import inside `with workflow.unsafe...` counts too


def test_the_domain_package_imports_none_of_the_outer_rooms() -> None:
    wrong = {
        name: sorted(t for t in targets if t.split(".")[0] in OUTER)
        for name, targets in GRAPH.items() if name.split(".")[0] == "mailqueue"
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_no_route_imports_another_route() -> None:
    routes = {name for name in MODULES if name.startswith("api.routes.")}
    assert {name: sorted(GRAPH[name] & routes) for name in routes if GRAPH[name] & routes} == {}


def test_routes_reach_the_database_and_temporal_only_through_the_services() -> None:
    """A route parses and answers; what happens is a service's (the one every front door calls)."""
    for name in (n for n in MODULES if n.startswith("api.routes.") and n != "api.routes.health"):
        source = MODULES[name].read_text()
        for word in ("sqlmodel", "sqlalchemy", "temporalio", "session.", "mailqueue.email_store", "mailqueue.template_store"):
            assert word not in source, f"{name} uses {word}: that belongs in api/services"


def test_activities_do_not_import_each_other() -> None:
    activities = {name for name in MODULES if name.startswith("activities.")} - {"activities", "activities.failures"}
    assert {name: sorted(GRAPH[name] & activities) for name in activities if GRAPH[name] & activities} == {}


def test_there_are_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_cycle_check_can_fail() -> None:
    GRAPH["mailqueue.contracts"].add("workflows.send_email")  # which imports contracts: a cycle
    try:
        assert any({"mailqueue.contracts", "workflows.send_email"} <= set(group) for group in _cycles())
    finally:
        GRAPH["mailqueue.contracts"].discard("workflows.send_email")
