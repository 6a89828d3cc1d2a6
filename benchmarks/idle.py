"""Idle-connection memory: open N TLS connections, make one request on each so every
connection holds its post-request state, then measure how much the proxy's RSS grew.
With ``http2``, each connection negotiates h2 by ALPN and its one request is an h2 stream."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from benchmarks import h2client
from benchmarks.procs import process_tree, rss_bytes

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
OPENING_CONCURRENCY = 64


def idle_memory(
    pid: int,
    port: int,
    count: int,
    ca: Path,
    *,
    host: str = "localhost",
    timeout: float = 120.0,
    http2: bool = False,
) -> dict[str, float]:
    """RSS growth of ``pid``'s process tree per idle TLS (or h2) connection, in KiB."""
    pids = process_tree(pid)
    context = ssl.create_default_context(cafile=str(ca))
    if http2:
        context.set_alpn_protocols(h2client.ALPN_OFFER)
    before = rss_bytes(pids)
    start = time.monotonic()
    opened, after = _run(_hold_idle(port, host, count, context, pids, timeout, http2))
    growth = after - before
    return {
        "asked": float(count),
        "opened": float(opened),
        "open_seconds": time.monotonic() - start,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "kib_per_conn": growth / 1024 / opened if opened else 0.0,
    }


def _run(main: Coroutine[Any, Any, tuple[int, int]]) -> tuple[int, int]:
    """Run on uvloop when it is there: the default loop's SSL buffers would only inflate
    the client's memory, which is not measured, but also slow the opening down."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _hold_idle(
    port: int,
    host: str,
    count: int,
    context: ssl.SSLContext,
    pids: list[int],
    within: float,
    http2: bool = False,
) -> tuple[int, int]:
    """Open up to ``count`` connections within ``within`` seconds, let the proxy settle, read RSS,
    close them all; returns (connections opened, RSS while they were open). Over h2, a
    connection where ALPN did not pick h2 or whose stream did not end is not counted."""
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(OPENING_CONCURRENCY)

    async def open_one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=host, ssl_handshake_timeout=30
            )
            writers.append(writer)
            if http2:
                chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
                if chosen != "h2":
                    raise h2client.H2Error(f"ALPN chose {chosen or 'nothing'}")
                await h2client.get(reader, writer, host)
                return
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_content_length(head))

    tasks = [asyncio.ensure_future(open_one()) for _ in range(count)]  # noqa: TID251 - kept in list
    try:
        await asyncio.wait(tasks, timeout=within)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        opened = sum(1 for task in tasks if not task.cancelled() and task.exception() is None)
        await asyncio.sleep(1.0)  # let the proxy finish its per-connection bookkeeping
        return opened, rss_bytes(pids)
    finally:
        for writer in writers:
            writer.close()
        closing = asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing, 15)


def _content_length(head: bytes) -> int:
    """The response's Content-Length (the upstream always sends one for ``/``)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0
