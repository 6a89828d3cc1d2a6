"""The composition root: ``Proxy`` binds the listeners and wires certificates to them.

``async with Proxy(config) as proxy: await proxy.serve_forever()`` is the whole life of a
proxy; the CLI and embedding programs are thin shells over it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from acme_client.interfaces import ChallengeStore
from proxy import metrics, status, status_page, worker_status
from proxy.accesslog import AccessLog
from proxy.acme_sites import challenge_store_for
from proxy.admission import Gate
from proxy.certsources import CertificateManager
from proxy.certstore import CertStore
from proxy.challenge_http import HTTPResponder
from proxy.config import Address, Config, ConfigError, start_problems
from proxy.connection import ClientConnection, Runtime
from proxy.plainhttp import Answer, PlainHTTPProtocol, text
from proxy.router import Router
from proxy.tasks import spawn
from proxy.tlsconn import TLSListener
from proxy.upstream import UpstreamPool

log = logging.getLogger("tlsproxy")


@dataclass(frozen=True, slots=True)
class Listener:
    """A bound listening socket: what was asked for and where it actually listens."""

    kind: str  # "https" | "http" | "admin"
    address: Address
    bound: tuple[str, int]


class Proxy:
    """A running tlsproxy: TLS listeners, port-80 responder, certificate maintenance."""

    def __init__(
        self,
        config: Config,
        *,
        challenges: ChallengeStore | None = None,
        cert_store: CertStore | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self.reuse_port = reuse_port  # several workers share the ports (SO_REUSEPORT)
        # ACME tokens live in storage by default: `tlsproxy renew` and replicas share them
        self.challenges = challenges if challenges is not None else challenge_store_for(config.tls)
        self.cert_store = cert_store if cert_store is not None else CertStore()
        self.listeners: list[Listener] = []
        self._servers: list[asyncio.Server] = []
        self._plain_connections: set[asyncio.Transport] = set()
        self._runtime: Runtime | None = None
        self._certs: CertificateManager | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None  # worker snapshots (workers > 1)
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "Proxy.start() has not run"
        return self._runtime

    async def start(self) -> None:
        """Load certificates, bind every listener, start certificate maintenance."""
        config = self.config
        problems = start_problems(config)
        if problems:
            raise ConfigError(problems)
        settings = config.server
        self._certs = CertificateManager(
            self.cert_store,
            config.sites,
            config.tls,
            acme=config.acme,
            challenges=self.challenges,
        )
        await asyncio.to_thread(self._certs.load_all)
        pool = UpstreamPool(settings.upstream_connect_timeout)
        access_log = None if settings.access_log == "off" else AccessLog(settings.access_log)
        self._runtime = Runtime(settings, Router(config.sites, pool), pool, access_log)
        try:
            await self._bind_all()
        except BaseException:
            self._close_servers()
            raise
        self._maintenance = spawn(self._certs.run(), name="certificate maintenance")
        self._sweeper = spawn(self.runtime.sweep_forever(), name="deadlines")
        folder = worker_status.directory(config.tls)
        if self.reuse_port and folder is not None:  # one of several workers
            self._publisher = spawn(
                worker_status.publish_forever(folder, self.runtime.pool, lambda: self.config.sites),
                name="worker status",
            )
        self._log_summary()

    async def _bind_all(self) -> None:
        loop = asyncio.get_running_loop()
        runtime = self.runtime
        settings = runtime.settings
        context = self.cert_store.listener_context(  # the lambdas see reloaded settings
            reject_unknown=lambda: runtime.settings.unknown_sni == "reject"
        )
        self.gate = Gate(
            lambda: runtime.settings.max_connections,
            runtime.connections,
            settings.handshake_timeout,
        )
        for address in settings.https_listen:

            def client(port: int = address.port) -> ClientConnection:
                return ClientConnection(runtime, port)

            server = await loop.create_server(
                TLSListener(context, self.gate, client),
                address.host,
                address.port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                backlog=2048,
            )
            self._add_server("https", address, server)
        responder = HTTPResponder(self.challenges, lambda: runtime.router, settings.https_port)
        for address in settings.http_listen:
            server = await loop.create_server(
                lambda: PlainHTTPProtocol(responder, self._plain_connections),
                address.host,
                address.port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
            self._add_server("http", address, server)
        if settings.admin_listen is not None:
            address = settings.admin_listen
            if not _is_loopback(address.host):
                log.warning("admin listener on %s: /metrics is open to that network", address)
            server = await loop.create_server(
                lambda: PlainHTTPProtocol(self._admin, self._plain_connections),
                address.host,
                address.port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
            self._add_server("admin", address, server)

    def _add_server(self, kind: str, address: Address, server: asyncio.Server) -> None:
        self._servers.append(server)
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            self.listeners.append(Listener(kind, address, (host, port)))

    def _admin(self, request: object) -> Answer:
        target = getattr(request, "target", b"")
        path = target.partition(b"?")[0]
        if path == b"/healthz":
            return text(503, "draining") if self.runtime.draining else text(200, "ok")
        token = self.runtime.settings.admin_token
        if token and not _authorized(token, getattr(request, "headers", ())):
            challenge = (b"www-authenticate", b'Bearer, Basic realm="tlsproxy admin"')
            return Answer(401, b"401 Unauthorized: send the admin token\n", (challenge,))
        if path in (b"/", b"/api/status"):
            runtime = self.runtime
            folder = worker_status.directory(self.config.tls)
            snapshots = (
                worker_status.read_fresh(folder)
                if self._publisher is not None and folder is not None
                else None
            )
            document = status.collect(
                self.config, runtime.pool, self.cert_store, snapshots=snapshots
            )
            if path == b"/":
                return status_page.html_answer(document)
            return status_page.json_answer(document)
        if path == b"/metrics":
            scraped = [
                metrics.open_connections(self.gate.open_connections()),
                metrics.certificates(self.cert_store.entries()),
            ]
            return Answer(200, metrics.REGISTRY.render(scraped), content_type=metrics.CONTENT_TYPE)
        return text(404)

    def port(self, kind: str = "https") -> int:
        """The first bound port of a kind of listener (useful with port 0 in embedding)."""
        return next(listener.bound[1] for listener in self.listeners if listener.kind == kind)

    def _log_summary(self) -> None:
        for listener in self.listeners:
            log.info("listening: %s on %s", listener.kind, listener.address)
        for site in self.config.sites:
            upstreams = ", ".join(u.url for u in site.upstreams)
            routes = "".join(
                f"; {r.path} -> {', '.join(u.url for u in r.upstreams)}" for r in site.routes
            )
            log.info("site %s -> %s%s", " ".join(site.hosts), upstreams, routes)
        for entry in self.cert_store.entries():
            log.info(
                "certificate %s: %s (%s), valid until %s",
                " ".join(entry.names),
                entry.issuer,
                entry.source,
                entry.not_after.isoformat(timespec="seconds"),
            )

    async def serve_forever(self) -> None:
        """Wait until ``stop()`` has finished (from a signal, or another task)."""
        await self._stopped.wait()

    async def reload(self, config: Config) -> None:
        """Apply a new configuration: sites, upstreams, certificates; open connections stay.

        Listen addresses and worker settings need a restart and are only reported.
        """
        problems = start_problems(config)
        if problems:
            raise ConfigError(problems)
        old = self.config.server
        new = config.server
        if (old.https_listen, old.http_listen, old.admin_listen) != (
            new.https_listen,
            new.http_listen,
            new.admin_listen,
        ):
            log.warning("reload: listen addresses changed; they take effect on restart")
        assert self._certs is not None
        await asyncio.to_thread(self._certs.reload, config.sites, config.tls, config.acme)
        runtime = self.runtime
        runtime.settings = new
        runtime.peers.clear()  # trusted_proxies may have changed
        runtime.pool.connect_timeout = new.upstream_connect_timeout
        runtime.access_log = None if new.access_log == "off" else AccessLog(new.access_log)
        runtime.router = Router(config.sites, runtime.pool)
        self.config = config
        log.info("reloaded: %d site(s)", len(config.sites))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close everything."""
        if self._stopping is None:
            self._stopping = spawn(self._stop(), name="stop")
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        runtime = self._runtime
        self._close_servers()
        if runtime is not None:
            runtime.draining = True
            for transport in list(self._plain_connections):
                transport.close()
            busy = [c for c in list(runtime.connections) if not c.close_if_idle()]
            if busy:
                log.info("draining %d in-flight request(s)", len(busy))
            if runtime.connections:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(runtime.settings.shutdown_timeout):
                        await runtime.drained.wait()
            for connection in list(runtime.connections):
                if connection.transport is not None:
                    connection.transport.abort()
            runtime.pool.close_idle()
        for task in (self._maintenance, self._sweeper, self._publisher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._stopped.set()
        log.info("stopped")

    def _close_servers(self) -> None:
        for server in self._servers:
            server.close()


def _authorized(token: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """``Authorization: Bearer <token>``, or Basic with the token as password (so a browser
    can prompt for it); compared in constant time."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, credentials = value.partition(b" ")
        if scheme.lower() == b"basic":
            try:
                credentials = base64.b64decode(credentials, validate=True).partition(b":")[2]
            except binascii.Error:
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), token.encode())
    return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
