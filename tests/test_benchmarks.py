"""The benchmark suite keeps working: its quick mode (ours only, about a second per workload)
runs end to end and produces a table and JSON with sane numbers. Speed is never asserted
here — that is what the full comparison (`python -m benchmarks.run`) is for."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import h2client
from benchmarks.load import BY_KEY, NoH2, lua_script, metrics, parse_h2load, parse_wrk
from benchmarks.report import detail_table, headline_table, target_rows

ROOT = Path(__file__).resolve().parent.parent
EXIT_UNAVAILABLE = 3


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    """One quick run shared by the tests below: (console output, results.json, out dir)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the suite reads /proc and pins with taskset: Linux only")
    out = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if completed.returncode == EXIT_UNAVAILABLE and "apt-get" in completed.stderr:
        pytest.skip(f"benchmark tools cannot be installed here: {completed.stderr.strip()}")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    return completed.stdout, result, out


@pytest.mark.timeout(300)
def test_quick_mode_measures_every_workload_of_ours(
    quick_run: tuple[str, dict[str, Any], Path],
) -> None:
    _stdout, result, _out = quick_run
    assert result["mode"] == "quick"
    assert list(result["contenders"]) == ["tlsproxy"]
    assert result["contenders"]["tlsproxy"]["tls"].startswith("TLSv1.3")
    skipped_handshake = any(note.startswith("handshake skipped") for note in result["notes"])
    skipped_h2 = any(note.startswith("h2 skipped") for note in result["notes"])
    expected = {"keepalive", "close", "large", "post"}
    if not skipped_handshake:
        expected.add("handshake")
    if not skipped_h2:
        expected.add("h2")
    assert set(result["summary"]) == expected
    for workload, by_contender in result["summary"].items():
        ours = by_contender["tlsproxy"]
        assert ours["requests"] > 0, workload
        assert ours["rps"] > 0, workload
        assert 0 < ours["p50_ms"] <= ours["p99_ms"], workload
        assert ours["mib_per_s"] > 0, workload
        assert ours["cpu_s"] > 0, workload
        assert ours["cpu_per_10k"] > 0, workload
        assert ours["peak_rss_mib"] > 1, workload
        assert ours["errors"] <= 0.05 * ours["requests"], workload
    assert (
        result["summary"]["large"]["tlsproxy"]["mib_per_s"]
        > result["summary"]["keepalive"]["tlsproxy"]["mib_per_s"]
    ), "1 MiB responses move more bytes than 13-byte ones"
    idle = result["idle"]["tlsproxy"]
    assert idle["opened"] == idle["asked"] == 200
    assert idle["rss_after_mib"] > 0
    alpn = result["contenders"]["tlsproxy"]["alpn"]
    if alpn == "h2":
        # HTTP/2 is in: a GET over h2 worked, every idle connection negotiated h2, every
        # h2load run did too
        assert "tlsproxy" not in result["no_h2"], result["no_h2"]
        idle_h2 = result["idle_h2"]["tlsproxy"]
        assert idle_h2["opened"] == idle_h2["asked"] == 200
        h2_runs = [run for run in result["runs"] if run["workload"] == "h2"]
        assert h2_runs or any("h2load is not installed" in note for note in result["notes"])
        assert all(run["protocol"] == "h2" for run in h2_runs)
    else:
        # not yet: skipped with a note, never measured over HTTP/1.1 in its place
        assert result["no_h2"]["tlsproxy"].startswith("no h2")
        assert skipped_h2 and "h2" not in result["summary"] and not result["idle_h2"]
    machine = result["machine"]
    assert machine["nproc"] >= 1 and machine["python"] and machine["cpu_model"]


@pytest.mark.timeout(300)
def test_quick_mode_prints_the_table_and_writes_the_files(
    quick_run: tuple[str, dict[str, Any], Path],
) -> None:
    stdout, _result, out = quick_run
    assert "keep-alive small GET" in stdout
    assert "req per proxy CPU-s" in stdout
    assert any(line.startswith("tlsproxy ") for line in stdout.splitlines())
    markdown = (out / "results.md").read_text()
    assert "| tlsproxy |" in markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")


def test_wrk_summary_line_is_parsed(tmp_path: Path) -> None:
    """The Lua ``done`` hook's line, as wrk prints it after its own text report."""
    stdout = (
        "Running 1s test @ https://localhost:1/\n  1 threads and 64 connections\n"
        "WRK-RESULT 1200 1000000 2400000 0 2 0 1 0 3.250 12.500\n"
    )
    result = parse_wrk(stdout)
    assert (result.requests, result.duration_s, result.bytes_read) == (1200, 1.0, 2400000)
    assert result.errors == {"connect": 0, "read": 2, "write": 0, "status": 1, "timeout": 0}
    values = metrics(result, BY_KEY["post"])
    assert values["rps"] == 1200
    assert values["mib"] == pytest.approx((2400000 + 1200 * 100 * 1024) / 2**20)
    script = lua_script(BY_KEY["post"], tmp_path).read_text()
    assert 'wrk.method = "POST"' in script and "string.rep" in script
    with pytest.raises(RuntimeError, match="no result"):
        parse_wrk("unable to connect to localhost:1 Connection refused\n")


H2LOAD_OUTPUT = """starting benchmark...
spawning thread #0: 8 total client(s). Timing-based test with 0s of warm-up time and 3s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: {protocol}
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 3.00s, 21973.33 req/s, 1.68MB/s
requests: 65920 total, 66048 started, 65920 done, 65900 succeeded, 20 failed, 12 errored, 2 timeout
status codes: 65900 2xx, 0 3xx, 0 4xx, 8 5xx
traffic: 5.03MB (5273992) total, 3.08MB (3230080) headers (space savings 50.51%), 836.88KB (856960) data
                     min         max         mean         sd        +/- sd
time for request:      278us     80.22ms      5.56ms      6.70ms    90.63%
time for connect:     6.08ms      6.45ms      6.26ms       123us    75.00%
"""  # noqa: E501 - h2load's own line


def test_h2load_summary_is_parsed_and_alpn_fallback_refused() -> None:
    """Counts, bytes and protocol from h2load's text; percentiles from its per-request log;
    a run that ALPN did not put on h2 is no HTTP/2 measurement."""
    durations = list(range(1, 1001))  # microseconds
    result = parse_h2load(H2LOAD_OUTPUT.format(protocol="h2"), durations_us=durations)
    assert (result.requests, result.succeeded, result.duration_s) == (65920, 65900, 3.0)
    assert result.bytes_read == 5273992
    assert result.errors == {"http": 8, "errored": 10, "timeout": 2}
    assert (result.p50_ms, result.p99_ms) == (0.5, 0.99)
    assert result.protocol == "h2" and result.tls == "TLSv1.3 TLS_AES_128_GCM_SHA256"
    values = metrics(result, BY_KEY["h2"])
    assert values["errors"] == 20 and values["rps"] == pytest.approx(65920 / 3)
    assert values["mean_ms"] == 5.56 and values["max_ms"] == 80.22
    without_log = parse_h2load(H2LOAD_OUTPUT.format(protocol="h2"))
    assert (without_log.p50_ms, without_log.p99_ms) == (5.56, 80.22)  # mean, max
    with pytest.raises(NoH2, match=r"http/1\.1"):
        parse_h2load(H2LOAD_OUTPUT.format(protocol="http/1.1"))
    no_alpn = H2LOAD_OUTPUT.replace("Application protocol: {protocol}\n", "")
    with pytest.raises(NoH2, match="nothing"):
        parse_h2load(no_alpn)
    with pytest.raises(RuntimeError, match="no result"):
        parse_h2load("", "connect to 127.0.0.1:1 failed\n")


async def test_h2_client_sends_a_get_and_reads_the_body_back() -> None:
    """The hand-written frames: preface, SETTINGS, a HEADERS block HPACK decoders accept;
    server SETTINGS acknowledged, padded DATA unpadded, the stream's end found."""
    received = bytearray()
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readexactly(len(h2client.request_frames("localhost"))))
        writer.write(h2client.frame(h2client.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64"))
        writer.write(h2client.frame(h2client.HEADERS, h2client.END_HEADERS, 1, b"\x88"))
        padded = b"\x03" + b"hello, bench\n" + b"\x00" * 3
        flags = h2client.END_STREAM | h2client.PADDED
        writer.write(h2client.frame(h2client.DATA, flags, 1, padded))
        received.extend(await reader.readexactly(9))  # the SETTINGS ACK
        writer.close()
        served.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = await asyncio.wait_for(h2client.get(reader, writer, "localhost"), 5)
        await asyncio.wait_for(served.wait(), 5)
        writer.close()
    assert body == b"hello, bench\n"
    assert received.startswith(h2client.PREFACE)
    # :method GET, :scheme https, :path /, :authority "localhost" (literal, not indexed)
    headers = h2client.frame(h2client.HEADERS, 0x5, 1, b"\x82\x87\x84\x01\x09localhost")
    assert headers in received
    assert received.endswith(h2client.frame(h2client.SETTINGS, h2client.ACK, 0))


def test_tables_say_no_h2_flag_errors_and_judge_the_targets() -> None:
    """Ours without h2 shows "no h2" (never an HTTP/1.1 figure), a peer's errored runs are
    flagged, and the targets are judged on ratios within the run."""

    def run(name: str, repeat: int, per_cpu: float, errors: float = 0) -> dict[str, Any]:
        values = {"req_per_cpu_s": per_cpu, "p99_ms": 2.0, "errors": errors, "requests": 1e5}
        return {"contender": name, "workload": "h2", "repeat": repeat, "metrics": values}

    runs = [run("nginx", 1, 35_000.0), run("caddy", 1, 6_000.0, errors=3)]
    runs += [run("nginx", 2, 37_000.0), run("caddy", 2, 6_400.0)]
    result: dict[str, Any] = {
        "contenders": {"tlsproxy": {}, "nginx": {}, "caddy": {}},
        "runs": runs,
        "summary": {
            "h2": {
                "nginx": {"req_per_cpu_s": 36_000.0, "p99_ms": 2.0, "errors": 0.0},
                "caddy": {"req_per_cpu_s": 6_200.0, "p99_ms": 2.0, "errors": 1.5},
            }
        },
        "idle": {},
        "idle_h2": {"nginx": {"kib_per_conn": 16.0}},
        "no_h2": {"tlsproxy": "no h2 (ALPN chose http/1.1)"},
        "settings": {"workloads": ["h2"]},
    }
    table = headline_table(result, ["tlsproxy", "nginx", "caddy"])
    per_cpu = next(row for row in table if row[1].startswith("req per proxy CPU-s"))
    assert per_cpu[2:] == ["no h2", "36,000", "6,200 [errors in 1/2 runs]"]
    idle = next(row for row in table if row[0] == "idle HTTP/2 connection")
    assert idle[2:] == ["no h2", "16.0", "-"]
    detail = detail_table(result, "h2", ["tlsproxy", "nginx", "caddy"])
    assert detail[1][:2] == ["tlsproxy", "no h2 (ALPN chose http/1.1)"]
    assert detail[2][-1] == "36,000 (35,000-37,000)"
    verdicts = [row[2] for row in target_rows(result)[1:]]
    assert verdicts == [
        "not measured (ours: no h2); in this run: >= 9,300",  # 1.5x Caddy's median
        "not measured (ours: no h2)",
    ]
    runs += [run("tlsproxy", 1, 9_600.0), run("tlsproxy", 2, 9_000.0)]
    result["summary"]["h2"]["tlsproxy"] = {"req_per_cpu_s": 9_300.0}
    result["idle_h2"]["tlsproxy"] = {"kib_per_conn": 50.0}
    rows = {row[0]: row[1:] for row in target_rows(result)[1:]}
    assert rows["HTTP/2 small GET: req per proxy CPU-s >= 1.5x Caddy's h2"] == [
        "1.50x (per round 1.41-1.60x)",
        "met",
    ]
    assert rows["idle HTTP/2 connection <= 48 KiB"] == ["50.0", "not met"]
