"""The README's first command: examples/demo.py prints a curl line, and that line works at
once; a port someone else holds is noticed; SIGTERM and SIGINT stop the app it started."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT, free_port

VARIABLES = (
    "TLSPROXY_DEMO_HTTPS_PORT",
    "TLSPROXY_DEMO_HTTP_PORT",
    "TLSPROXY_DEMO_APP_PORT",
    "TLSPROXY_DEMO_STORAGE",
)


class OtherProgram:
    """Some other program's HTTP server, holding a port the demo might want."""

    def __init__(self, port: int = 0) -> None:
        self._sock = socket.create_server(("127.0.0.1", port))
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        body = b"not the example app"
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self._sock.close()


@dataclass
class Demo:
    process: subprocess.Popen[str]
    output: list[str]  # lines so far

    def read_until(self, prefix: str, timeout: float = 30) -> str:
        """Lines until one starts with ``prefix``; that line ("" if the demo ended first)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                return ""
            self.output.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line in {timeout} s:\n{''.join(self.output)}")

    def app_pid(self) -> int:
        """The uvicorn child the demo started."""
        [pid] = children(self.process.pid)
        return pid

    def curl(self, line: str) -> subprocess.CompletedProcess[str]:
        """Run the printed ``try:`` line, exactly once."""
        command = shlex.split(line.removeprefix("try:"))
        return subprocess.run(
            [*command, "-sS", "--max-time", "10"], capture_output=True, text=True, timeout=20
        )


@contextlib.contextmanager
def demo(tmp_path: Path, *args: str, **ports: int) -> Iterator[Demo]:
    """examples/demo.py with ``TLSPROXY_DEMO_<NAME>_PORT`` set for each of ``ports`` (others
    unset: their defaults) and its storage in ``tmp_path``."""
    env = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    env.update({f"TLSPROXY_DEMO_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    env.update(TLSPROXY_DEMO_STORAGE=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "examples/demo.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Demo(process, [])
    try:
        yield running
    finally:
        left = children(process.pid)  # a broken demo must not leave its app behind
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert process.stdout is not None
        process.stdout.close()


def children(pid: int) -> list[int]:
    try:
        return [
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except FileNotFoundError:
        return []


def free_ports() -> dict[str, int]:
    return {"https": free_port(), "http": free_port(), "app": free_port()}


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_the_printed_curl_line_works_the_moment_it_is_printed(tmp_path: Path) -> None:
    with demo(tmp_path, **free_ports()) as running:
        line = running.read_until("try:")
        assert line.startswith("try:  curl --cacert "), "".join(running.output)
        result = running.curl(line)  # at once: no retry, no 502 while the app starts
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["message"] == "hello from the example app behind tlsproxy"
        assert seen["scheme"] == "https"
        assert seen["client"] == "127.0.0.1"
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(15) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_demo_and_the_app_it_started(tmp_path: Path, sig: int) -> None:
    ports = free_ports()
    with demo(tmp_path, **ports) as running:
        running.read_until("try:")
        app = running.app_pid()
        try:
            running.process.send_signal(sig)  # to the demo alone, as `kill` and systemd do
            assert running.process.wait(15) == 0, "".join(running.output)
            deadline = time.monotonic() + 10
            while not gone(app) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone(app), "the example app still runs after the demo exited"
        finally:
            if not gone(app):
                os.kill(app, signal.SIGKILL)


def test_a_taken_default_app_port_is_not_forwarded_to(tmp_path: Path) -> None:
    """Port 8000 held by another program: the demo starts the app on a free port instead."""
    try:
        other: OtherProgram | None = OtherProgram(8000)
    except OSError:  # something holds port 8000 already: just as good
        other = None
    try:
        ports = free_ports()
        del ports["app"]
        with demo(tmp_path, **ports) as running:
            line = running.read_until("try:")
            output = "".join(running.output)
            assert "port 8000 is taken" in output, output
            result = running.curl(line)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["message"].startswith("hello from the example app")
            running.process.send_signal(signal.SIGTERM)
            assert running.process.wait(15) == 0
    finally:
        if other is not None:
            other.close()


def test_a_taken_port_that_was_asked_for_is_refused_clearly(tmp_path: Path) -> None:
    other = OtherProgram()
    try:
        ports = free_ports()
        ports["https"] = other.port
        with demo(tmp_path, **ports) as running:
            assert running.read_until("try:") == "", "".join(running.output)
            assert running.process.wait(15) == 1
            output = "".join(running.output)
            assert f"TLSPROXY_DEMO_HTTPS_PORT={other.port}" in output, output
            assert "taken" in output and "Traceback" not in output, output
    finally:
        other.close()


def test_the_demo_documents_its_variables(tmp_path: Path) -> None:
    with demo(tmp_path, "--help", **free_ports()) as running:
        assert running.process.wait(30) == 0
        assert running.process.stdout is not None
        usage = running.process.stdout.read()
    readme = (ROOT / "README.md").read_text()
    source = (ROOT / "examples" / "demo.py").read_text()
    for name in VARIABLES:
        assert name in source
        assert name in usage, f"--help does not mention {name}"
        assert name in readme, f"the README does not mention {name}"
