"""Real processes on loopback for integration tests: uvicorn apps, tlsproxy, curl."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0
) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class RefusingPort:
    """A port that is reserved (bound, not listening), so connecting to it is refused."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()


class UvicornApp:
    """``examples.app`` (or another ASGI app) under a real uvicorn, trusting the proxy."""

    def __init__(
        self, app: str = "examples.app:app", trusted: str = "127.0.0.1", extra: Sequence[str] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--proxy-headers",
                "--forwarded-allow-ips",
                trusted,
                "--log-level",
                "warning",
                *extra,
            ],
            cwd=ROOT,
        )
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class ProxyProcess:
    """``python -m proxy run`` on free loopback ports with a config the test writes."""

    directory: Path
    https_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls,
        directory: Path,
        sites: Sequence[dict[str, object]],
        *,
        server: dict[str, Any] | None = None,
        issuer: str = "internal",
        wait: bool = True,
        tables: dict[str, dict[str, Any]] | None = None,
    ) -> ProxyProcess:
        https_port, http_port = free_port(), free_port()
        settings: dict[str, Any] = {
            "https_listen": [f"127.0.0.1:{https_port}"],
            "http_listen": [f"127.0.0.1:{http_port}"],
            "https_port": https_port,
            "admin_listen": "",
        }
        settings.update(server or {})
        config = {
            "server": settings,
            "tls": {"storage": str(directory / "data"), "issuer": issuer},
            **(tables or {}),
            "sites": list(sites),
        }
        (directory / "proxy.toml").write_text(to_toml(config))
        log_path = directory / "proxy.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(directory / "proxy.toml")],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proxy = cls(directory, https_port, http_port, process, log_path)
        if wait:
            wait_for_port(https_port, process=process)
        return proxy

    @property
    def config_path(self) -> Path:
        return self.directory / "proxy.toml"

    @property
    def root_ca(self) -> Path:
        return self.directory / "data" / "ca" / "root.pem"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop_process(self.process, sig)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root_ca))


def to_toml(data: dict[str, Any]) -> str:
    """Just enough TOML for test configs: tables, arrays of tables, strings, numbers, lists."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.insert(0, f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A value as TOML writes it; tables inside a table become inline tables."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def curl(
    proxy: ProxyProcess, host: str, path: str = "/", *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """A real curl request to ``host`` through the proxy, verifying against its root CA."""
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(proxy.root_ca),
            "--resolve",
            f"{host}:{proxy.https_port}:127.0.0.1",
            *args,
            f"https://{host}:{proxy.https_port}{path}",
        ],
        capture_output=True,
        text=True,
        check=check,
        timeout=30,
    )


def https_request(
    proxy: ProxyProcess,
    host: str,
    request: bytes,
    *,
    source: str | None = None,
    read_until_close: bool = True,
) -> bytes:
    """Raw bytes over TLS (SNI ``host``), from an optional source address; returns the reply."""
    context = proxy.client_context()
    with (
        socket.create_connection(
            ("127.0.0.1", proxy.https_port),
            timeout=20,
            source_address=(source, 0) if source else None,
        ) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(request)
        chunks = []
        while True:
            data = tls.recv(65536)
            if not data:
                break
            chunks.append(data)
            if not read_until_close and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def body_json(response: bytes) -> Any:
    _head, _, body = response.partition(b"\r\n\r\n")
    return json.loads(body)


os.environ.setdefault("PYTHONUNBUFFERED", "1")


class LoopbackServer:
    """A threaded TCP server on 127.0.0.1: each accepted connection gets a thread running
    :meth:`serve`. Subclasses say what to do with a connection."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def accepted(self, conn: socket.socket) -> None:
        """Called in the accepting thread before ``serve`` starts (bookkeeping)."""

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._sock.close()


class RawUpstream(LoopbackServer):
    """A tiny threaded HTTP/1.1 upstream on loopback that records what reaches it.

    ``mode="ok"`` answers every request with 200 and keeps the connection open;
    ``mode="silent"`` accepts and never answers (for upstream timeouts).
    """

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.connections = 0
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        super().__init__()

    def accepted(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._open.append(conn)

    def serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    with self._lock:
                        self.requests.append(head)
                    if self.mode == "ok":
                        body = b"raw upstream %d" % self.port
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                        )
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        super().close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
