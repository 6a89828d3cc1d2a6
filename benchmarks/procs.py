"""Processes the suite starts: pinned to a core, in their own session, always cleaned up,
and measured from ``/proc`` (CPU time of the whole process tree, resident memory)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def cores() -> tuple[int | None, int | None]:
    """(proxy core, load core): 0 and 1 when the machine has two, else no pinning at all."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def pinned(argv: Sequence[str], core: int | None) -> list[str]:
    """``argv`` run under ``taskset`` (which execs, so the pid stays the program's)."""
    return ["taskset", "-c", str(core), *argv] if core is not None else list(argv)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Block until something accepts on ``port``; fail fast if ``process`` died instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Started:
    """A process the suite started, with the log file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        """The end of its log, to explain a failure."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Starts processes in their own session and kills every one of them on exit.

    A new session per process means the terminal's Ctrl-C reaches only the suite, which
    then stops each group itself (nginx's master and workers together) — nothing is left
    behind, whether the run ends normally, by an error or by a signal.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Started] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        core: int | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Started:
        """Start ``argv`` pinned to ``core``, output to ``<directory>/<name>.log``."""
        log = self.directory / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                pinned(argv, core),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        started = Started(name, process, log)
        self.started.append(started)
        return started

    def stop(self, started: Started, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
        process = started.process
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace)
        _signal_group(process.pid, signal.SIGKILL)  # leftover children of the group too
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
        if started in self.started:
            self.started.remove(started)

    def close(self) -> None:
        """Stop everything still running, newest first (proxies before their upstream)."""
        for started in reversed(list(self.started)):
            self.stop(started)


def _signal_group(pgid: int, sig: int) -> None:
    """Signal a whole process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (nginx's workers, for example)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state, 1 the ppid)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return []
    return text[text.rfind(")") + 2 :].split()


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root``'s tree, including children it already reaped."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if len(fields) > 14:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            if pid == root:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLOCK_TICKS


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of ``pids`` added up (from /proc/<pid>/statm)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as file:
                total += int(file.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakRSS:
    """Samples a process tree's RSS every ``interval`` seconds in a thread; ``peak`` is the
    highest sum seen (the kernel's VmHWM is per process and since start, not per run)."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.pids = process_tree(root)
        self.interval = interval
        self.peak = rss_bytes(self.pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pids))

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pids))
