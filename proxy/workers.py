"""Several worker processes sharing the listening ports (SO_REUSEPORT), one supervisor.

The supervisor forks before it creates any event loop, so each worker starts clean. The
kernel spreads new connections over the workers' sockets. Signals go to the supervisor:
SIGTERM/SIGINT are passed on (every worker drains, then the supervisor exits 0), SIGHUP is
passed on (every worker reloads its config file). A worker that dies unexpectedly is
restarted, at most once a second per slot. Workers share certificates through storage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger("tlsproxy.workers")

RESTART_DELAY = 1.0  # seconds between restarts of one crashing slot
STARTUP_GRACE = 3.0  # a worker that gives up (exit > 0) this soon fails the whole run


def worker_count(setting: int | str) -> int:
    """``workers`` from the config: a number, or "auto" for one per CPU core."""
    if setting == "auto":
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    return int(setting)


def supervise(count: int, work: Callable[[int], int]) -> int:
    """Run ``work(slot)`` in ``count`` forked processes until told to stop; the exit code."""
    stopping = False
    children: dict[int, int] = {}  # pid -> slot
    last_start: dict[int, float] = {}

    def start(slot: int) -> None:
        last_start[slot] = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the worker: default signal handling, its own event loop
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            code = 1
            try:
                code = work(slot)
            finally:
                os._exit(code)
        children[pid] = slot

    def forward(sig: int) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def on_stop(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        forward(signal.SIGTERM)

    def on_reload(sig: int, _frame: object) -> None:
        forward(signal.SIGHUP)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    for slot in range(count):
        start(slot)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    log.info("supervisor %d: %d workers started", os.getpid(), count)
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        slot = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed = failed or code != 0
            continue
        if code > 0 and time.monotonic() - last_start[slot] < STARTUP_GRACE:
            log.error("worker %d (pid %d) failed at start (exit %d); stopping", slot, pid, code)
            failed = stopping = True
            forward(signal.SIGTERM)
            continue
        log.error("worker %d (pid %d) exited with %d; restarting it", slot, pid, code)
        wait = last_start[slot] + RESTART_DELAY - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if not stopping:
            start(slot)
    return 1 if failed else 0
