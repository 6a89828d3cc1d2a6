"""What each worker alone knows, shared so that any worker's status page shows them all.

With ``workers`` > 1 the kernel hands each admin connection to one worker, but request
counts and upstream health live in every worker's memory. So every worker writes a small
snapshot of them to storage every few seconds, and the page merges the fresh ones.
Certificates need none of this: they are read from storage anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxy import metrics
from proxy.certs.pemfiles import CERT_MODE, write_atomic
from proxy.config import Site, TLSConfig, Upstream
from proxy.http.upstream import UpstreamPool

INTERVAL = 2.0  # seconds between a worker's snapshots
FRESH = 10.0  # older snapshots belong to workers that are gone


def directory(tls: TLSConfig) -> Path | None:
    """Where snapshots go: beside the certificates (not available with Redis storage)."""
    directory = tls.location.directory
    return None if directory is None else directory / "status" / "workers"


def snapshot(pool: UpstreamPool, sites: Sequence[Site]) -> dict[str, Any]:
    """This worker's request counts, upstream errors and failing upstreams."""
    upstreams = {u for site in sites for u in (*site.upstreams, *_routed(site))}
    failing: dict[str, list[Any]] = {}
    for upstream in upstreams:
        state = pool.failing(upstream)
        if state is not None:
            failing[upstream.url] = [state[0], state[1]]
    return {
        "pid": os.getpid(),
        "requests": [[s, c, v] for (s, c), v in metrics.REQUESTS.values.items()],
        "protocols": [[p, v] for (p,), v in metrics.REQUESTS_BY_PROTOCOL.values.items()],
        "upstream_errors": [[s, k, v] for (s, k), v in metrics.UPSTREAM_ERRORS.values.items()],
        "failing": failing,
    }


def _routed(site: Site) -> list[Upstream]:
    return [u for route in site.routes for u in route.upstreams]


def read_fresh(folder: Path) -> list[dict[str, Any]]:
    """Every worker's snapshot written within the last ``FRESH`` seconds."""
    found: list[dict[str, Any]] = []
    cutoff = time.time() - FRESH
    for path in folder.glob("*.json"):
        try:
            if path.stat().st_mtime < cutoff:
                continue
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced, or gone: the next look sees it
    return found


async def publish_forever(
    folder: Path, pool: UpstreamPool, sites: Callable[[], Sequence[Site]]
) -> None:
    """Write this worker's snapshot every ``INTERVAL`` seconds until cancelled."""
    path = folder / f"{os.getpid()}.json"
    try:
        while True:
            data = json.dumps(snapshot(pool, sites())).encode()
            await asyncio.to_thread(_write, folder, path, data)
            await asyncio.sleep(INTERVAL)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _write(folder: Path, path: Path, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, CERT_MODE)
