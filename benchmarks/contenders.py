"""The contenders (ours and the peers) and the upstream: their configuration files, rendered
from the templates in ``benchmarks/peers/``, and how each one is started and checked."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import h2client, tools
from benchmarks.certs import CertFiles
from benchmarks.procs import Processes, Started, free_port, wait_for_port

TEMPLATES = Path(__file__).resolve().parent / "peers"
ROOT = Path(__file__).resolve().parent.parent
OURS = "tlsproxy"
OURS_2W = "tlsproxy-2w"  # ours with two worker processes on the same core: their overhead
PEERS = (OURS_2W, "nginx", "haproxy", "caddy", "mitmproxy")
SMALL_BODY = b"hello, bench\n"


@dataclass(frozen=True, slots=True)
class Setup:
    """What every contender's configuration needs to know."""

    directory: Path
    certs: CertFiles
    upstream_port: int
    nofile: int
    installer: tools.Installer
    proxy_root: Path  # where `python -m proxy` is imported from (a snapshot of the tree)


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start one contender."""

    name: str
    version: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


@dataclass
class Running:
    """A started contender, checked to answer through TLS; ``alpn`` is what it picks when
    offered ``h2, http/1.1``, and ``no_h2`` why it cannot be measured over HTTP/2 ("" when
    it can: ALPN chose h2 and a GET over h2 brought the upstream's body)."""

    launch: Launch
    started: Started
    tls: str
    alpn: str = ""
    no_h2: str = ""

    @property
    def h2(self) -> bool:
        return self.alpn == "h2" and not self.no_h2

    @property
    def name(self) -> str:
        return self.launch.name

    @property
    def pid(self) -> int:
        return self.started.pid


class Unavailable(Exception):
    """A peer that cannot be had here; the message says why (it goes into the report)."""


def render(template: str, values: Mapping[str, object], directory: Path) -> Path:
    """Fill the ``{{NAME}}`` placeholders of a template and write it into ``directory``."""
    text = (TEMPLATES / template).read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", str(value))
    left = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)))
    if left:
        raise ValueError(f"{template}: no value for {', '.join(left)}")
    path = directory / template
    path.write_text(text)
    return path


def _common(setup: Setup, port: int) -> dict[str, object]:
    """Values every template may use."""
    connections = max(1024, min(16384, setup.nofile - 256))
    return {
        "DIR": setup.directory,
        "PORT": port,
        "UPSTREAM_PORT": setup.upstream_port,
        "CERT": setup.certs.chain,
        "KEY": setup.certs.key,
        "BUNDLE": setup.certs.bundle,
        "NOFILE": setup.nofile,
        "CONNECTIONS": connections,
        "MAXCONN": max(256, min(10_000, (setup.nofile - 256) // 2)),
        # as root, nginx workers would drop to "nobody", who cannot read a 0700 scratch dir
        "USER": "user root;" if os.geteuid() == 0 else "",
    }


def _binary(setup: Setup, command: str) -> str:
    """A peer's program, installed if missing and allowed, else ``Unavailable``."""
    path = setup.installer.find(command)
    if path is None:
        how = "" if setup.installer.allowed else " (installing needs root and apt-get)"
        raise Unavailable(f"`{command}` is not installed{how}")
    return path


def upstream_launch(setup: Setup) -> Launch:
    """The cheap native upstream: nginx answering a 13-byte body, a 1 MiB file, uploads."""
    nginx = _binary(setup, "nginx")
    www = setup.directory / "www"
    www.mkdir(exist_ok=True)
    (www / "1m").write_bytes(os.urandom(2**20))
    conf = render("upstream-nginx.conf", _common(setup, setup.upstream_port), setup.directory)
    return Launch(
        "upstream",
        tools.version_of([nginx, "-v"]).removeprefix("nginx version: ").replace("/", " "),
        _nginx_argv(nginx, conf, setup.directory),
        setup.upstream_port,
    )


def _nginx_argv(nginx: str, conf: Path, directory: Path) -> list[str]:
    """nginx in the foreground on our config, its start-up errors kept in ``directory``."""
    return [nginx, "-c", str(conf), "-p", f"{directory}/", "-e", str(directory / "startup.log")]


def launch_tlsproxy(setup: Setup, workers: int = 1) -> Launch:
    """Ours: ``python -m proxy run`` from the snapshot, no access log, ``workers`` processes
    (pinned like every contender: two workers share one core, so CPU per request shows
    what a second worker costs)."""
    port = free_port()
    name = OURS if workers == 1 else OURS_2W
    values = {**_common(setup, port), "WORKERS": workers}
    directory = setup.directory / name
    directory.mkdir(exist_ok=True)
    conf = render("tlsproxy.toml", {**values, "DIR": directory}, directory)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(conf)]
    env = {"PYTHONPATH": str(setup.proxy_root), "PYTHONDONTWRITEBYTECODE": "1"}
    version = _our_version() + ("" if workers == 1 else f", {workers} workers")
    return Launch(name, version, argv, port, env, setup.proxy_root)


def _our_version() -> str:
    """``tlsproxy <version> (<commit>, clean|local changes)``."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    state = tools.source_state(ROOT)
    return f"tlsproxy {version} ({state['commit']}, {state['proxy_changes']})"


def launch_nginx(setup: Setup) -> Launch:
    """nginx: one worker, upstream keep-alive, request bodies streamed."""
    nginx = _binary(setup, "nginx")
    port = free_port()
    conf = render("nginx.conf", _common(setup, port), setup.directory)
    version = tools.version_of([nginx, "-v"]).removeprefix("nginx version: ").replace("/", " ")
    return Launch("nginx", version, _nginx_argv(nginx, conf, setup.directory), port)


def launch_haproxy(setup: Setup) -> Launch:
    """HAProxy: one thread, foreground (-db), upstream connections always reused."""
    haproxy = _binary(setup, "haproxy")
    port = free_port()
    conf = render("haproxy.conf", _common(setup, port), setup.directory)
    line = tools.version_of([haproxy, "-v"])
    match = re.search(r"version (\S+)", line)
    version = f"HAProxy {match.group(1)}" if match else line
    return Launch("haproxy", version, [haproxy, "-f", str(conf), "-db"], port)


def launch_caddy(setup: Setup) -> Launch:
    """Caddy: GOMAXPROCS=1, no admin API, no automatic HTTPS, its state in the scratch dir."""
    caddy = _binary(setup, "caddy")
    port = free_port()
    conf = render("caddy.conf", _common(setup, port), setup.directory)
    home = setup.directory / "caddy-home"
    home.mkdir(exist_ok=True)
    env = {
        "GOMAXPROCS": "1",
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    version = "caddy " + tools.version_of([caddy, "version"]).split()[0].lstrip("v")
    argv = [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"]
    return Launch("caddy", version, argv, port, env)


def launch_mitmproxy(setup: Setup) -> Launch:
    """mitmproxy (mitmdump) in reverse mode, from its own virtualenv, our key + chain."""
    binary, why = tools.mitmdump(install=setup.installer.allowed)
    if binary is None:
        raise Unavailable(f"mitmproxy: {why}")
    port = free_port()
    argv = [
        str(binary),
        "-q",
        "--mode",
        f"reverse:http://127.0.0.1:{setup.upstream_port}",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--certs",
        f"*={setup.certs.bundle}",
        "--set",
        f"confdir={setup.directory / 'mitmproxy'}",
    ]
    line = tools.version_of([str(binary), "--version"])
    version = "mitmproxy " + line.split(":", 1)[-1].strip()
    return Launch("mitmproxy", version, argv, port)


LAUNCHERS: dict[str, Callable[[Setup], Launch]] = {
    OURS: launch_tlsproxy,
    OURS_2W: lambda setup: launch_tlsproxy(setup, 2),
    "nginx": launch_nginx,
    "haproxy": launch_haproxy,
    "caddy": launch_caddy,
    "mitmproxy": launch_mitmproxy,
}


def start(procs: Processes, launch: Launch, core: int | None, ca: Path | None) -> Running:
    """Start a contender pinned to ``core``; with ``ca``, check it answers a real HTTPS
    request (certificate verified, body from the upstream) before anything is measured."""
    started = procs.start(launch.name, launch.argv, core=core, env=launch.env, cwd=launch.cwd)
    try:
        wait_for_port(launch.port, started.process)
        tls = probe(launch.port, ca) if ca is not None else ""
    except (RuntimeError, OSError, ssl.SSLError) as error:
        procs.stop(started)
        raise Unavailable(f"{launch.name} did not start: {error}\n{started.log_tail()}") from None
    running = Running(launch, started, tls)
    if ca is not None:
        running.alpn, running.no_h2 = h2_support(launch.port, ca)
    return running


def h2_support(port: int, ca: Path) -> tuple[str, str]:
    """(ALPN chosen when offered ``h2, http/1.1``, why h2 is out: "" when a GET over h2
    brought the upstream's body)."""
    try:
        alpn = h2client.negotiate(port, str(ca))
    except (OSError, ssl.SSLError) as error:
        return "?", f"no h2: ALPN check failed ({error})"
    if alpn != "h2":
        return alpn, f"no h2 (ALPN chose {'nothing' if alpn == 'none' else alpn})"
    try:
        body = h2client.fetch(port, str(ca))
    except (OSError, ssl.SSLError, TimeoutError, EOFError, h2client.H2Error) as error:
        return alpn, f"no h2: a GET over h2 failed ({type(error).__name__}: {error})"
    if body != SMALL_BODY:
        return alpn, f"no h2: a GET over h2 answered {body[:60]!r}"
    return alpn, ""


def probe(port: int, ca: Path, timeout: float = 15.0) -> str:
    """One verified HTTPS GET through the proxy; returns the TLS version and cipher used."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _probe_once(port, context)
        except (OSError, ssl.SSLError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _probe_once(port: int, context: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()  # read before the close: some servers end the session with it
        negotiated = f"{tls.version()} {cipher[0] if cipher else '?'}"
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
        status = reply.split(b"\r\n", 1)[0].split()
        if status[1:2] != [b"200"] or not reply.endswith(SMALL_BODY):
            raise RuntimeError(f"unexpected answer: {reply[:200]!r}")
        return negotiated


def snapshot(directory: Path) -> Path:
    """Copy ``proxy/`` and ``acme_client/`` so every repeat measures the same code, even if
    the working tree changes while the suite runs."""
    target = directory / "src"
    for package in ("proxy", "acme_client"):
        shutil.copytree(
            ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return target
