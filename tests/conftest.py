"""Fixtures many test modules share: a raw loopback upstream, the DNS server Pebble asks,
and a private podman for the container tests.

A module that needs something else under the same name (test_http_strict's recording
upstream) defines its own fixture, which takes precedence.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pebble import LoopbackDNS
from tests.podman import Podman, private_podman, unavailable
from tests.support import RawUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    server = RawUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    """Answers A 127.0.0.1 for every name and no AAAA (tests/pebble.py says why)."""
    server = LoopbackDNS()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    """This session's own podman (configuration, storage), with the base image imported
    under the name the Dockerfile's FROM uses; skipped only where no engine can run."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with private_podman() as engine:
        engine.import_base()
        yield engine
