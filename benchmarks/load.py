"""The workloads, and the load generators driving them: wrk for HTTP/1.1 (one Lua script per
workload sets the request and prints wrk's own summary — count, bytes, errors, latency
percentiles — as one parsable line) and h2load for HTTP/2 (its text summary parsed, the
latency percentiles taken from its per-request log)."""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import pinned

MIB = 2**20
RESULT_TAG = "WRK-RESULT"
H2_CLIENTS = 8  # h2load -c: connections
H2_STREAMS = 16  # h2load -m: concurrent streams on each


@dataclass(frozen=True, slots=True)
class Workload:
    """One kind of traffic; ``headline`` is the metric the summary compares it on."""

    key: str
    title: str
    path: str
    headline: str
    method: str = "GET"
    body_bytes: int = 0
    close: bool = False  # `Connection: close`: a new TCP + TLS connection per request
    full_handshake: bool = False  # drop the TLS session so no reconnect resumes it
    h2: bool = False  # HTTP/2 with h2load (ALPN must pick h2) instead of HTTP/1.1 with wrk


WORKLOADS = (
    Workload("keepalive", "keep-alive small GET", "/", "rps"),
    Workload("close", "new connection per request (TLS resumed)", "/", "req_per_cpu_s", close=True),
    Workload(
        "handshake",
        "new connection per request (full handshake)",
        "/",
        "req_per_cpu_s",
        close=True,
        full_handshake=True,
    ),
    Workload("large", "1 MiB responses", "/1m", "mib_per_cpu_s"),
    Workload(
        "post", "100 KiB POST", "/upload", "req_per_cpu_s", method="POST", body_bytes=100 * 1024
    ),
    Workload(
        "h2",
        f"HTTP/2 small GET (h2load -c {H2_CLIENTS} -m {H2_STREAMS})",
        "/",
        "req_per_cpu_s",
        h2=True,
    ),
)
BY_KEY = {workload.key: workload for workload in WORKLOADS}


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What wrk (or h2load) measured in one run (latencies in milliseconds)."""

    requests: int
    duration_s: float
    bytes_read: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class H2LoadResult(WrkResult):
    """What h2load measured, with the protocol ALPN picked and the TLS it negotiated."""

    protocol: str = ""  # "h2", or "http/1.1" / "none" when the server did not pick h2
    tls: str = ""  # "TLSv1.3 TLS_AES_128_GCM_SHA256"
    succeeded: int = 0
    extra: dict[str, float] = field(default_factory=dict)  # mean/max request time, ms


class NoH2(RuntimeError):
    """h2load was answered in HTTP/1.1 (or without ALPN): the run is no HTTP/2 measurement."""

    def __init__(self, protocol: str) -> None:
        super().__init__(f"no h2 (ALPN chose {'nothing' if protocol == 'none' else protocol})")
        self.protocol = protocol


def lua_script(workload: Workload, directory: Path) -> Path:
    """Write the wrk script of ``workload``: its request, and a ``done`` that reports."""
    lines = [f'wrk.method = "{workload.method}"']
    if workload.body_bytes:
        lines.append(f'wrk.body = string.rep("x", {workload.body_bytes})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    if workload.close:
        lines.append('wrk.headers["Connection"] = "close"')
    fields = " ".join(["%.0f"] * 8 + ["%.3f", "%.3f"])
    lines += [
        "function done(summary, latency, requests)",
        "  local e = summary.errors",
        f'  io.write(string.format("{RESULT_TAG} {fields}\\n",',
        "    summary.requests, summary.duration, summary.bytes,",
        "    e.connect, e.read, e.write, e.status, e.timeout,",
        "    latency:percentile(50) / 1000, latency:percentile(99) / 1000))",
        "end",
    ]
    path = directory / f"wrk-{workload.key}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(
    url: str,
    script: Path,
    *,
    duration: int,
    connections: int,
    core: int | None,
    preload: Path | None = None,
) -> WrkResult:
    """One wrk run (-t1, pinned to ``core``), bounded to ``duration`` + 60 seconds."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency"]
    argv += ["-s", str(script), url]
    env = dict(os.environ)
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    result = subprocess.run(
        pinned(argv, core), capture_output=True, text=True, timeout=duration + 60, env=env
    )
    return parse_wrk(result.stdout, result.stderr)


def parse_wrk(stdout: str, stderr: str = "") -> WrkResult:
    """Read the line our Lua ``done`` printed; anything else from wrk explains a failure."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG + " "):
            values = [float(value) for value in line.split()[1:]]
            names = ("connect", "read", "write", "status", "timeout")
            return WrkResult(
                requests=int(values[0]),
                duration_s=values[1] / 1e6,
                bytes_read=int(values[2]),
                errors={name: int(v) for name, v in zip(names, values[3:8], strict=True)},
                p50_ms=values[8],
                p99_ms=values[9],
            )
    output = (stdout + stderr).strip().splitlines()
    raise RuntimeError("wrk gave no result: " + " | ".join(output[-5:]))


def run_h2load(
    url: str, *, duration: int, core: int | None, log: Path, clients: int = H2_CLIENTS
) -> H2LoadResult:
    """One h2load run (-t1 -c8 -m16 -D, pinned to ``core``), bounded to ``duration`` + 60
    seconds; ``log`` receives its per-request log (read back for the percentiles).
    Raises ``NoH2`` when ALPN did not pick h2 (h2load would quietly fall back to HTTP/1.1)."""
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{H2_STREAMS}", f"-D{duration}"]
    argv += [f"--log-file={log}", url]
    result = subprocess.run(
        pinned(argv, core), capture_output=True, text=True, timeout=duration + 60
    )
    try:
        durations = _log_durations(log)
    finally:
        log.unlink(missing_ok=True)
    return parse_h2load(result.stdout, result.stderr, durations)


def _log_durations(log: Path) -> list[int]:
    """Microseconds per request from h2load's log (start time, status, duration per line)."""
    try:
        with log.open() as file:
            return [int(line.split("\t")[2]) for line in file if line.count("\t") >= 2]
    except OSError:
        return []


_H2LOAD_FIELDS = {
    "finished": re.compile(r"^finished in ([\d.]+)(m?s),"),
    "requests": re.compile(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout"
    ),
    "traffic": re.compile(r"^traffic: \S+ \((\d+)\) total"),
    "request_time": re.compile(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)"),
}


def parse_h2load(
    stdout: str, stderr: str = "", durations_us: list[int] | None = None
) -> H2LoadResult:
    """h2load's text summary: protocol, TLS, counts, bytes; percentiles from ``durations_us``
    (its per-request log) when given, else its mean and max request times stand in."""
    protocol = "none"
    tls_version = cipher = ""
    found: dict[str, re.Match[str]] = {}
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("Application protocol:"):
            protocol = line.split(":", 1)[1].strip()
        elif line.startswith("TLS Protocol:"):
            tls_version = line.split(":", 1)[1].strip()
        elif line.startswith("Cipher:"):
            cipher = line.split(":", 1)[1].strip()
        for name, pattern in _H2LOAD_FIELDS.items():
            if name not in found and (match := pattern.match(line)):
                found[name] = match
    if "requests" not in found or "finished" not in found:
        output = (stdout + stderr).strip().splitlines()
        raise RuntimeError("h2load gave no result: " + " | ".join(output[-5:]))
    if protocol != "h2":
        raise NoH2(protocol)
    seconds = float(found["finished"].group(1))
    if found["finished"].group(2) == "ms":
        seconds /= 1000
    _total, _started, done, succeeded, failed, errored, timeout = (
        int(value) for value in found["requests"].groups()
    )
    mean_ms = max_ms = 0.0
    if "request_time" in found:
        max_ms, mean_ms = (_h2load_ms(found["request_time"].group(i)) for i in (2, 3))
    p50_ms, p99_ms = mean_ms, max_ms
    if durations_us:
        ordered = sorted(durations_us)
        p50_ms, p99_ms = (_percentile(ordered, q) / 1000 for q in (50, 99))
    traffic = found.get("traffic")
    return H2LoadResult(
        requests=done,
        duration_s=seconds,
        bytes_read=int(traffic.group(1)) if traffic else 0,
        # h2load's "failed" holds all three: HTTP-level (status not 2xx/3xx), "errored"
        # (reset streams, broken connections) and, among those, "timeout"
        errors={"http": failed - errored, "errored": errored - timeout, "timeout": timeout},
        p50_ms=p50_ms,
        p99_ms=p99_ms,
        protocol=protocol,
        tls=f"{tls_version} {cipher}".strip(),
        succeeded=succeeded,
        extra={"mean_ms": mean_ms, "max_ms": max_ms},
    )


def _h2load_ms(text: str) -> float:
    """h2load's durations: ``278us``, ``5.56ms``, ``1.02s``."""
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text.removesuffix(unit)) * scale
    return float(text)


def _percentile(ordered: list[int], q: float) -> float:
    """The nearest-rank percentile of a sorted list."""
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return float(ordered[rank - 1])


def metrics(result: WrkResult, workload: Workload) -> dict[str, float]:
    """The per-run numbers the report shows; CPU-based ones are added by the caller."""
    seconds = max(result.duration_s, 1e-9)
    moved = result.bytes_read + result.requests * workload.body_bytes
    values = {
        "requests": float(result.requests),
        "duration_s": seconds,
        "rps": result.requests / seconds,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "mib": moved / MIB,
        "mib_per_s": moved / MIB / seconds,
        "errors": float(sum(result.errors.values())),
        **{f"errors_{kind}": float(count) for kind, count in result.errors.items()},
    }
    if isinstance(result, H2LoadResult):
        values["succeeded"] = float(result.succeeded)
        values.update(result.extra)
    return values


def add_cpu(values: dict[str, float], cpu_s: float, peak_rss: int) -> None:
    """Add the proxy-side numbers: CPU per 10k requests, work per CPU-second, peak RSS."""
    values["cpu_s"] = cpu_s
    values["peak_rss_mib"] = peak_rss / MIB
    if cpu_s > 0 and values["requests"] > 0:
        values["cpu_per_10k"] = cpu_s / values["requests"] * 10_000
        values["req_per_cpu_s"] = values["requests"] / cpu_s
        values["mib_per_cpu_s"] = values["mib"] / cpu_s
