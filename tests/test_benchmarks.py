"""The benchmark suite keeps working: its quick mode (ours only, about a second per workload)
runs end to end and produces a table and JSON with sane numbers. Speed is never asserted
here — that is what the full comparison (`python -m benchmarks.run`) is for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load import BY_KEY, lua_script, metrics, parse_wrk

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
    expected = {"keepalive", "close", "large", "post"}
    if not skipped_handshake:
        expected.add("handshake")
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
