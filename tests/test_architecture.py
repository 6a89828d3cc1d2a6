"""The import direction docs/architecture.md promises, checked on every module's imports.

Layers, lowest first; a module may import its own layer and the layers below, never above.
``certs``, ``http`` and ``providers`` are siblings: none imports another (certificates reach the TLS
layer through ``proxy.tls``; the data path knows nothing of where they come from).
``acme_client`` never imports ``proxy``. Imports under ``if TYPE_CHECKING:`` count too: a
layer that needs another's types to type-check is coupled to it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT

FOUNDATION = {"proxy.config", "proxy.metrics", "proxy.tasks"}
COMPOSITION = {
    "proxy",
    "proxy.__main__",
    "proxy.cli",
    "proxy.envconfig",
    "proxy.preflight",
    "proxy.renew",
    "proxy.server",
    "proxy.workers",
}
RANK = {
    "foundation": 0,
    "tls": 1,
    "certs": 2,
    "http": 2,
    "providers": 2,
    "plain": 3,
    "admin": 4,
    "top": 5,
}


def layer(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module in COMPOSITION:
        return "top"
    part = module.split(".")[1]
    assert part in RANK, f"{module} belongs to no layer: add it to docs/architecture.md"
    return part


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "proxy":  # from proxy import metrics: the module, not the package
                yield from (f"proxy.{alias.name}" for alias in node.names)
            else:
                yield node.module


def _target(imported: str) -> str | None:
    """The proxy module (or package) an import names, or None for other packages."""
    if imported != "proxy" and not imported.startswith("proxy."):
        return None
    known = {name for name, _ in modules("proxy")}
    while imported not in known and "." in imported:  # ``from proxy.http.exchange import X``
        imported = imported.rsplit(".", 1)[0]
    return imported


@pytest.mark.parametrize(("name", "path"), list(modules("proxy")), ids=lambda v: str(v))
def test_imports_point_down_the_layers(name: str, path: Path) -> None:
    own = layer(name)
    for imported in imports(path):
        target = _target(imported)
        if target is None:
            continue
        other = layer(target)
        assert RANK[other] <= RANK[own], f"{name} ({own}) imports {target} ({other})"
        if own != other and RANK[own] == RANK[other]:
            pytest.fail(f"{name} ({own}) imports its sibling layer: {target} ({other})")


def test_acme_client_never_imports_proxy() -> None:
    for name, path in modules("acme_client"):
        assert not [i for i in imports(path) if i == "proxy" or i.startswith("proxy.")], name


def test_the_layers_are_documented() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    for package in ("tls", "http", "http/h1", "certs", "providers", "plain", "admin"):
        assert f"proxy/{package}/" in text, package


def _module_of(imported: str, known: set[str]) -> str | None:
    """The module of ours an import names (``from a.b import C`` names ``a.b``), or None."""
    while imported not in known and "." in imported:
        imported = imported.rsplit(".", 1)[0]
    return imported if imported in known else None


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in it (functions too)."""
    paths = dict(modules("proxy")) | dict(modules("acme_client"))
    known = set(paths)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = {_module_of(imported, known) for imported in imports(path)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    """A cycle (even through an import inside a function) means two modules are one job
    split in two, or one of them is in the wrong place; the package ``proxy`` itself is
    left out: its ``__init__`` re-exports the public names of the modules below it."""
    graph = import_graph()
    graph.pop("proxy", None)
    for targets in graph.values():
        targets.discard("proxy")
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
