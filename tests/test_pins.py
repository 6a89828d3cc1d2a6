"""The test environment is reproducible: everything ``tlsproxy[test]`` pulls in is pinned.

tests/run.sh installs with ``PIP_CONSTRAINT=tests/constraints.txt``. A dependency added to
pyproject.toml without a pin would let pip pick whatever is newest on the day of the run (a
new redis release once broke mypy for every fresh clone); these tests name it.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT

CONSTRAINTS = ROOT / "tests" / "constraints.txt"


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def _closure(root: str, extras: set[str]) -> set[str]:
    """The installed distributions ``root[extras]`` needs, transitively."""
    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            ):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in seen:
                seen.add(dependency)
                todo.append((dependency, set(requirement.extras)))
    return seen


def test_every_installed_test_dependency_is_pinned_at_its_installed_version() -> None:
    pins = _pins()
    needed = _closure("tlsproxy", {"test"})
    assert {"redis", "mypy", "pytest", "cryptography"} <= needed  # the walk found real ones
    unpinned = sorted(needed - pins.keys())
    assert not unpinned, f"add to tests/constraints.txt: {unpinned}"
    drift = {
        name: (pins[name], metadata.version(name))
        for name in needed
        if metadata.version(name) != pins[name]
    }
    assert not drift, f"installed versions differ from the pins (pin, installed): {drift}"


def test_the_test_command_installs_through_the_constraints() -> None:
    script = (ROOT / "tests" / "run.sh").read_text()
    setting, _, install = script.partition('PIP_CONSTRAINT="$PWD/tests/constraints.txt" \\\n')
    assert setting and install, "tests/run.sh must install with PIP_CONSTRAINT"
    assert "pip install" in install.splitlines()[0]


def test_the_build_backend_is_pinned() -> None:
    pins = _pins()
    for name in ("hatchling", "packaging", "pathspec", "pluggy", "trove-classifiers"):
        assert name in pins, name
