"""The import direction docs/architecture.md promises, checked on every module's imports.

Layers, lowest first; a module may import its own layer and the layers below, never above.
``certs`` and ``http`` are siblings: neither imports the other (certificates reach the TLS
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
RANK = {"foundation": 0, "tls": 1, "certs": 2, "http": 2, "plain": 3, "admin": 4, "top": 5}


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
    for package in ("tls", "http", "http/h1", "certs", "plain", "admin"):
        assert f"proxy/{package}/" in text, package
