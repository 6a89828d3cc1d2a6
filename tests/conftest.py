"""Fixtures many test modules share: a raw loopback upstream and the DNS server Pebble asks.

A module that needs something else under the same name (test_http_strict's recording
upstream) defines its own fixture, which takes precedence.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pebble import LoopbackDNS
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
