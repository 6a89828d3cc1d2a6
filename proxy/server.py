"""The composition root: ``Proxy`` binds the listeners and wires certificates to them.

``async with Proxy(config) as proxy: await proxy.serve_forever()`` is the whole life of a
proxy; the CLI and embedding programs are thin shells over it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import errno
import hmac
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

from acme_client.interfaces import ChallengeStore
from acme_client.location import open_storage
from acme_client.tlsalpn import ALPNChallenges
from proxy import metrics
from proxy.admin import status, status_page, worker_status
from proxy.certs.acme_sites import challenge_store_for
from proxy.certs.alpn import ALPNChallengeContexts
from proxy.certs.manager import CertificateManager
from proxy.certs.on_demand import OnDemand
from proxy.certs.sources import CertificateSources
from proxy.certs.store import CertStore
from proxy.config import Address, Config, ConfigError, ServerConfig, Site, start_problems
from proxy.http.accesslog import AccessLog
from proxy.http.h1.server import H1Connection
from proxy.http.h2.server import H2Connection
from proxy.http.router import Router
from proxy.http.runtime import Runtime
from proxy.http.upstream import UpstreamPool
from proxy.plain.redirect import HTTPResponder
from proxy.plain.server import Answer, PlainHTTPProtocol, text
from proxy.providers.docker import DockerProvider
from proxy.providers.labels import DiscoveredSite
from proxy.providers.merge import Merged, merge
from proxy.tasks import spawn
from proxy.tls.admission import Gate
from proxy.tls.connection import TLSListener
from proxy.tls.proxy_phase import Sources

log = logging.getLogger("tlsproxy")


@dataclass(frozen=True, slots=True)
class Listener:
    """A bound listening socket: what was asked for and where it actually listens."""

    kind: str  # "https" | "http" | "admin"
    address: Address
    bound: tuple[str, int]


Key = tuple[str, Address]  # (kind, configured address): one entry of the listen settings
REBIND_WAIT = 1.0  # seconds to wait for a port an outgoing listener of ours has just released


@dataclass(slots=True)
class _Open:
    """One configured listen address while it is bound: its server, and the plain-HTTP
    connections it accepted (an admin listener's are closed with it, see ``Proxy.reload``)."""

    kind: str
    address: Address
    server: asyncio.Server
    connections: set[asyncio.Transport] = field(default_factory=set)

    def listeners(self) -> list[Listener]:
        return [
            Listener(self.kind, self.address, tuple(sock.getsockname()[:2]))
            for sock in self.server.sockets
        ]

    def close(self) -> None:
        self.server.close()
        if self.kind == "admin":
            for transport in list(self.connections):
                transport.close()


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
        self._open: dict[Key, _Open] = {}  # in the order of the settings
        self._runtime: Runtime | None = None
        self._context: ssl.SSLContext | None = None  # the TLS listeners' (certificates by SNI)
        self._responder: HTTPResponder | None = None  # port 80's; replaced on reload
        self._proxy_sources = Sources()  # who sends a PROXY header; changed in place on reload
        self._certs = CertificateManager(self.cert_store)  # every certificate served, by names
        self._sources: CertificateSources | None = None  # where they come from; per config
        self._alpn: ALPNChallengeContexts | None = None  # TLS-ALPN-01 answers, made on first use
        self._on_demand: OnDemand | None = None  # when a site has on_demand = true
        self._tls_listeners: list[TLSListener] = []  # their hold hook follows reloads
        self._maintenance: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None  # worker snapshots (workers > 1)
        self._discovery: asyncio.Task[None] | None = None  # [docker]: sites from labels
        self._discovered: tuple[DiscoveredSite, ...] = ()  # the provider's last list
        self.sites: Merged = merge(config.sites, ())  # what is served: the file's + discovered
        self._stopped = asyncio.Event()
        self._reloading = asyncio.Lock()  # one reload at a time: each diffs against the last
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
        self._sources = self._sources_for(config)
        await self._certs.replace_all(
            await asyncio.to_thread(self._sources.for_sites, config.sites)
        )
        self._set_on_demand(config)
        pool = UpstreamPool(settings.upstream_connect_timeout)
        access_log = None if settings.access_log == "off" else AccessLog(settings.access_log)
        runtime = Runtime(settings, Router(config.sites, pool), pool, access_log, batch=pool.batch)
        self._runtime = runtime
        self.cert_store.set_alpn(_alpn(settings))
        self._context = self.cert_store.listener_context(  # the lambdas see reloaded settings
            reject_unknown=lambda: runtime.settings.unknown_sni == "reject"
        )
        self.gate = Gate(
            lambda: runtime.settings.max_connections,
            runtime.connections,
            settings.handshake_timeout,
        )
        self._responder = HTTPResponder(
            self.challenges, lambda: runtime.router, settings.https_port
        )
        self._proxy_sources.networks = settings.proxy_protocol
        self._proxy_sources.timeout = settings.handshake_timeout
        try:
            for kind, address in _wanted(settings):
                self._open[kind, address] = await self._bind(kind, address)
        except BaseException:
            self._close_servers()
            raise
        self._index()
        self._maintenance = spawn(self._certs.run(), name="certificate maintenance")
        self._sweeper = spawn(self.runtime.sweep_forever(), name="deadlines")
        folder = worker_status.directory(config.tls)
        if self.reuse_port and folder is not None:  # one of several workers
            self._publisher = spawn(
                worker_status.publish_forever(folder, self.runtime.pool, lambda: self.sites.sites),
                name="worker status",
            )
        self._start_discovery()
        self._log_summary()

    async def _bind(self, kind: str, address: Address, *, start_serving: bool = True) -> _Open:
        """Bind one listener. An OSError says which address could not be had, and why."""
        loop = asyncio.get_running_loop()
        runtime = self.runtime
        connections: set[asyncio.Transport] = set()
        factory: Callable[[], asyncio.BaseProtocol]
        if kind == "https":
            assert self._context is not None

            def client(alpn: str | None, port: int = address.port) -> asyncio.Protocol:
                if alpn == "h2":
                    return H2Connection(runtime, port)
                return H1Connection(runtime, port)

            factory = TLSListener(
                self._context, self.gate, client, proxy_sources=self._proxy_sources
            )
            factory.alpn_challenge = self._alpn_hook(self.config)
            factory.hold = self._on_demand_hold()
            self._tls_listeners.append(factory)
        elif kind == "admin":  # not behind the balancer: probes and scrapers send no header

            def factory() -> PlainHTTPProtocol:
                return PlainHTTPProtocol(self._admin, connections)

        else:

            def factory() -> PlainHTTPProtocol:
                # port 80's current responder: a reload may change the redirects' port
                return PlainHTTPProtocol(self._responder_now(), connections, self._proxy_sources)

        try:
            server = await loop.create_server(
                factory,
                address.host,
                address.port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                backlog=2048 if kind == "https" else 100,
                start_serving=start_serving,
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot listen on {address} ({kind}): {reason}") from None
        return _Open(kind, address, server, connections)

    def _alpn_hook(self, config: Config) -> Callable[[str], ssl.SSLContext | None] | None:
        """The TLS listeners' TLS-ALPN-01 hook while ACME with tls-alpn-01 is configured;
        without it no ClientHello is looked at (a handshake costs nothing more)."""
        if config.tls.issuer != "acme" or "tls-alpn-01" not in config.acme.challenges:
            return None
        return self._alpn_challenge

    def _alpn_challenge(self, name: str) -> ssl.SSLContext | None:
        """TLS-ALPN-01: the challenge context for ``name`` (looked up when a ClientHello
        offers ``acme-tls/1``)."""
        if self._alpn is None:
            self._alpn = ALPNChallengeContexts(
                ALPNChallenges(open_storage(self.config.tls.location))
            )
        return self._alpn.context_for(name)

    def _on_demand_hold(self) -> Callable[[str | None], asyncio.Future[bool] | None] | None:
        """The TLS listeners' hold hook: on-demand's, when configured (else no ClientHello
        needs to be read for it)."""
        return self._on_demand.hold if self._on_demand is not None else None

    def _sources_for(self, config: Config) -> CertificateSources:
        """Where ``config``'s certificates come from; the current sources when a reload
        keeps the certificate settings (so running sources and their renewer stay)."""
        sources = CertificateSources(
            config.tls,
            config.acme,
            challenges=self.challenges,
            http_listen=bool(config.server.http_listen),
            on_change=self._certs.look_soon,
        )
        current = self._sources
        return current if current is not None and current.key == sources.key else sources

    def _set_on_demand(self, config: Config) -> None:
        """On-demand TLS for ``config`` (None without on-demand sites), on every listener."""
        ask = config.tls.on_demand
        wanted = ask is not None and any(site.on_demand for site in config.sites)
        self._on_demand = (
            OnDemand(self.cert_store, config.sites, ask.ask, self._obtain_on_demand)
            if wanted and ask is not None
            else None
        )
        for listener in self._tls_listeners:
            listener.hold = self._on_demand_hold()
            listener.alpn_challenge = self._alpn_hook(config)

    async def _obtain_on_demand(self, name: str) -> bool:
        """On-demand's ``obtain``: a certificate for ``name`` (from storage, or ordered now),
        then managed, served and renewed like a site's; False when it could not be had, or
        when a reload meanwhile stopped covering the name."""
        sources = self._sources
        assert sources is not None
        source = sources.acme_source((name,), None)
        if not await asyncio.to_thread(source.obtain):
            return False
        async with self._reloading:  # a reload cannot slip in between the check and the add
            on_demand = self._on_demand
            if sources is not self._sources or on_demand is None or not on_demand.covers(name):
                return False
            await self._certs.update(add=[source])
        await asyncio.to_thread(sources.remember_on_demand, name)
        log.info("on-demand certificate for %s: serving it", name)
        return self.cert_store.covers(name)

    def _responder_now(self) -> HTTPResponder:
        assert self._responder is not None
        return self._responder

    def _index(self) -> None:
        """``listeners`` from the open servers, in the order of the settings."""
        self.listeners = [
            listener for opened in self._open.values() for listener in opened.listeners()
        ]

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
                dataclasses.replace(self.config, sites=self.sites.sites),
                runtime.pool,
                self.cert_store,
                snapshots=snapshots,
                origins=self.sites.origins,
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
        self._log_admin_exposure()
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

    def _log_admin_exposure(self) -> None:
        notice = admin_exposure(self.config.server)
        if notice is not None:
            log.log(*notice)

    async def serve_forever(self) -> None:
        """Wait until ``stop()`` has finished (from a signal, or another task)."""
        await self._stopped.wait()

    async def reload(self, config: Config) -> None:
        """Apply a new configuration: sites, upstreams, certificates, settings and listen
        addresses; open connections stay.

        All or nothing: the new listen addresses are bound (not yet accepting) and the
        certificates prepared before anything changes. If either fails, what was bound is
        closed again, the error raised (an ``OSError`` names the address) and the old
        configuration stays whole. Otherwise the settings switch and the listeners no longer
        configured close in one step, with no await in between, and then the new ones start
        accepting: no listener ever answers under a configuration that does not list it (an
        admin socket left on 0.0.0.0 after its token was removed, say). Connections a closed
        listener accepted keep running, except the admin listener's, which are closed with
        it: their next request would be answered under the new token rule. ``workers`` and
        ``loop`` need a restart and are only reported. Reloads run one after the other.
        """
        async with self._reloading:
            await self._reload(config)

    async def _reload(self, config: Config) -> None:
        problems = start_problems(config)
        if problems:
            raise ConfigError(problems)
        old = self.config.server
        new = config.server
        if (old.workers, old.loop) != (new.workers, new.loop):
            log.warning("reload: workers and loop take effect on restart")
        wanted = _wanted(new)
        gone = [key for key in self._open if key not in wanted]
        added, released = await self._bind_new([k for k in wanted if k not in self._open], gone)
        old_docker = self.config.docker
        discovered = self._discovered if config.docker == old_docker else ()
        sites = merge(config.sites, discovered)
        sources = self._sources_for(config)
        try:
            await self._certs.replace_all(await asyncio.to_thread(sources.for_sites, sites.sites))
        except BaseException:
            if sources is not self._sources:
                sources.close()
            await self._undo(added, released)
            raise
        if sources is not self._sources and self._sources is not None:
            self._sources.close()
        self._sources = sources
        # The switch, with no await until the listeners no longer configured are closed.
        runtime = self.runtime
        runtime.settings = new
        runtime.peers.clear()  # trusted_proxies may have changed
        self._proxy_sources.networks = new.proxy_protocol  # for the next accepted connection
        self._proxy_sources.timeout = new.handshake_timeout
        runtime.pool.connect_timeout = new.upstream_connect_timeout
        runtime.access_log = None if new.access_log == "off" else AccessLog(new.access_log)
        runtime.router = Router(sites.sites, runtime.pool)
        self._log_overridden(sites, self.sites)
        self.sites, self._discovered = sites, discovered
        self._responder = HTTPResponder(self.challenges, lambda: runtime.router, new.https_port)
        self.cert_store.set_alpn(_alpn(new))
        for connection in list(runtime.connections):
            connection.retire()  # HTTP/2: GOAWAY, so clients reconnect to the new settings
        self.config = config
        self._set_on_demand(config)
        for key in gone:
            opened = self._open.pop(key)
            if key not in released:
                opened.close()
            log.info("stopped listening: %s on %s", *key)
        self._open = {key: added.get(key) or self._open[key] for key in wanted}
        self._index()
        for key, opened in added.items():  # the old ones are closed: the switch is done
            await opened.server.start_serving()
            log.info("listening: %s on %s", *key)
        if (old.admin_listen, bool(old.admin_token)) != (new.admin_listen, bool(new.admin_token)):
            self._log_admin_exposure()
        if config.docker != old_docker:
            self._start_discovery()  # [docker] added, changed or removed
        log.info("reloaded: %d site(s)", len(config.sites))

    # -- sites from container labels ------------------------------------------------------

    def _start_discovery(self) -> None:
        """Follow the Docker API if ``[docker]`` asks for it (replacing a provider that
        followed other settings)."""
        if self._discovery is not None:
            self._discovery.cancel()
            self._discovery = None
        if self.config.docker is not None:
            provider = DockerProvider(self.config.docker, self._apply_discovered)
            self._discovery = spawn(provider.run(), name="docker discovery")
            log.info("discovering sites from container labels at %s", self.config.docker.endpoint)

    async def _apply_discovered(self, discovered: tuple[DiscoveredSite, ...]) -> bool:
        """The provider's new list of labelled sites: merged with the file's (the file wins),
        certificates loaded or issued for the sites that came and dropped for those that
        went (off the event loop), then the router replaced in one assignment. Open
        connections, to any site, stay. False if not applied."""
        async with self._reloading:
            if self._sources is None or self._stopping is not None:
                return False
            sites = merge(self.config.sites, discovered)
            try:
                await self._update_certificates(self.sites.sites, sites.sites)
            except Exception as exc:
                log.error("discovered sites not applied (the previous ones stay): %s", exc)
                return False
            self.runtime.router = Router(sites.sites, self.runtime.pool)
            before = {h for site in self.sites.sites for h in site.hosts}
            after = {h for site in sites.sites for h in site.hosts}
            self._log_overridden(sites, self.sites)
            self.sites, self._discovered = sites, discovered
        for host in sorted(after - before):
            log.info("discovered: %s -> %s", host, _upstreams_of(sites.sites, host))
        for host in sorted(before - after):
            log.info("no longer discovered: %s", host)
        return True

    async def _update_certificates(self, old: Iterable[Site], new: Iterable[Site]) -> None:
        """Certificates for exactly the sites that came or went (container labels): each
        added site's is loaded or issued, each removed site's stops being served and
        renewed; every other certificate is left alone. Raises ``CertificateError``."""
        assert self._sources is not None
        before, after = {_certificate_key(s): s for s in old}, {_certificate_key(s): s for s in new}
        added = [site for key, site in after.items() if key not in before]
        sources = [s for site in added if (s := self._sources.for_site(site)) is not None]
        gone = [site.hosts for key, site in before.items() if key not in after]
        await self._certs.update(add=sources, remove=gone)

    @staticmethod
    def _log_overridden(new: Merged, old: Merged) -> None:
        """One warning per host that a label asks for and the file already has."""
        for host in sorted(new.overridden.keys() - old.overridden.keys()):
            containers = ", ".join(new.overridden[host])
            log.warning(
                "host %s is in the configuration file and in the labels of %s: "
                "the file wins, the labels are ignored for it",
                host,
                containers,
            )

    async def _bind_new(
        self, keys: list[Key], gone: list[Key]
    ) -> tuple[dict[Key, _Open], set[Key]]:
        """Bind ``keys`` without accepting yet: the new listeners, and which outgoing ones
        had to be closed first to free their port. On failure nothing new stays bound.

        A new address can clash with an outgoing listener of ours: 127.0.0.1:9901 cannot be
        bound while 0.0.0.0:9901 listens (unless both share SO_REUSEPORT, as workers do).
        Then the outgoing listeners on that port are closed first; if the port still cannot
        be had, they are bound again and the reload is refused.
        """
        added: dict[Key, _Open] = {}
        released: set[Key] = set()
        try:
            for key in keys:
                kind, address = key
                clashing = [k for k in gone if k[1].port == address.port and k not in released]
                try:
                    added[key] = await self._bind(kind, address, start_serving=False)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or not clashing:
                        raise
                for old in clashing:
                    self._open[old].close()
                    released.add(old)
                added[key] = await self._rebind(kind, address)
        except BaseException:
            await self._undo(added, released)
            raise
        return added, released

    async def _rebind(self, kind: str, address: Address) -> _Open:
        """Bind a port a listener of ours has just closed (uvloop frees it a moment later)."""
        deadline = asyncio.get_running_loop().time() + REBIND_WAIT
        while True:
            try:
                return await self._bind(kind, address, start_serving=False)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.02)

    async def _undo(self, added: dict[Key, _Open], released: set[Key]) -> None:
        """A refused reload: close what it bound, bind again what it closed."""
        for opened in added.values():
            opened.close()
        for key in released:
            try:
                reopened = await self._rebind(*key)
            except OSError as exc:
                log.error("%s; that listener stays closed until the next reload", exc)
                del self._open[key]
                continue
            await reopened.server.start_serving()
            self._open[key] = reopened
        self._index()

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
            for opened in self._open.values():
                for transport in list(opened.connections):
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
        for task in (self._discovery, self._maintenance, self._sweeper, self._publisher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._sources is not None:
            self._sources.close()
        for opened in self._open.values():
            await opened.server.wait_closed()
        self._open.clear()
        self._stopped.set()
        log.info("stopped")

    def _close_servers(self) -> None:
        for opened in self._open.values():
            opened.server.close()


def _wanted(settings: ServerConfig) -> list[Key]:
    """The listeners ``settings`` ask for, in order; an address listed twice is bound once."""
    wanted: list[Key] = [("https", address) for address in settings.https_listen]
    wanted += [("http", address) for address in settings.http_listen]
    if settings.admin_listen is not None:
        wanted.append(("admin", settings.admin_listen))
    return list(dict.fromkeys(wanted))


def admin_exposure(settings: ServerConfig) -> tuple[int, str] | None:
    """The log level and line that say what an admin listener off loopback opens to its
    network; None on loopback or with no admin listener.

    ``start_problems`` refuses such a listener without ``admin_token``, so what stays open is
    ``/healthz`` (probes need it); the warning is for a listener nothing protects.
    """
    address = settings.admin_listen
    if address is None or _is_loopback(address.host):
        return None
    if settings.admin_token:
        return (
            logging.INFO,
            f"admin listener on {address}: /healthz answers anyone on that network; the "
            "status page, /api/status and /metrics need the admin token",
        )
    return (
        logging.WARNING,
        f"admin listener on {address}: the status page, /api/status, /metrics and /healthz "
        "answer anyone on that network (no admin_token)",
    )


def _alpn(settings: ServerConfig) -> list[str]:
    """What the TLS listeners offer: ``h2`` first unless ``http2 = false``."""
    return ["h2", "http/1.1"] if settings.http2 else ["http/1.1"]


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


def _certificate_key(site: Site) -> tuple[object, ...]:
    """What a site's certificate depends on (not its upstreams)."""
    return (site.hosts, site.cert, site.key, site.on_demand)


def _upstreams_of(sites: Iterable[Site], host: str) -> str:
    site = next(site for site in sites if host in site.hosts)
    return ", ".join(upstream.url for upstream in site.upstreams)
