"""The workloads, and wrk driving them: one Lua script per workload sets the request and
prints wrk's own summary (count, bytes, errors, latency percentiles) as one parsable line."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import pinned

MIB = 2**20
RESULT_TAG = "WRK-RESULT"


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
)
BY_KEY = {workload.key: workload for workload in WORKLOADS}


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What wrk measured in one run (latencies in milliseconds)."""

    requests: int
    duration_s: float
    bytes_read: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float


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


def metrics(result: WrkResult, workload: Workload) -> dict[str, float]:
    """The per-run numbers the report shows; CPU-based ones are added by the caller."""
    seconds = max(result.duration_s, 1e-9)
    moved = result.bytes_read + result.requests * workload.body_bytes
    return {
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


def add_cpu(values: dict[str, float], cpu_s: float, peak_rss: int) -> None:
    """Add the proxy-side numbers: CPU per 10k requests, work per CPU-second, peak RSS."""
    values["cpu_s"] = cpu_s
    values["peak_rss_mib"] = peak_rss / MIB
    if cpu_s > 0 and values["requests"] > 0:
        values["cpu_per_10k"] = cpu_s / values["requests"] * 10_000
        values["req_per_cpu_s"] = values["requests"] / cpu_s
        values["mib_per_cpu_s"] = values["mib"] / cpu_s
