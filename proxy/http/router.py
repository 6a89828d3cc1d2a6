"""Host (and optional path prefix) to site, and which of the site's upstreams: built once per
configuration, read per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.config import Site, Upstream


@dataclass(frozen=True, slots=True)
class Route:
    """Where a matched request goes: the site (for logs and HSTS) and its balancer."""

    site: Site
    balancer: Balancer
    hsts: tuple[bytes, bytes] | None  # the site's Strict-Transport-Security field, if any
    name: str  # the site's name for logs and metrics (``Site.name``, looked up once)
    key: tuple[str]  # ``(name,)``: the metrics' label tuple, made once


@dataclass(frozen=True, slots=True)
class SiteRoutes:
    """A site's path-prefix routes, longest prefix first, and the fallback."""

    prefixes: tuple[tuple[bytes, Route], ...]
    fallback: Route

    def for_target(self, target: bytes) -> Route:
        for prefix, route in self.prefixes:
            if target.startswith(prefix) and (
                len(target) == len(prefix) or prefix.endswith(b"/") or target[len(prefix)] in b"/?"
            ):
                return route
        return self.fallback


class Router:
    """Maps a request's ``Host`` header to a site: exact name, then ``*.`` one label up."""

    _CACHE_LIMIT = 4096

    def __init__(self, sites: Sequence[Site], pool: Health) -> None:
        self._exact: dict[str, SiteRoutes] = {}
        self._wildcard: dict[str, SiteRoutes] = {}
        self._any: SiteRoutes | None = None  # hosts = ["*"]: an on-demand catch-all site
        self._cache: dict[bytes, SiteRoutes | None] = {}
        for site in sites:
            hsts = (b"strict-transport-security", site.hsts.encode()) if site.hsts else None
            key = (site.name,)
            fallback = Route(site, Balancer(site.upstreams, pool), hsts, site.name, key)
            prefixes = tuple(
                (r.path.encode(), Route(site, Balancer(r.upstreams, pool), hsts, site.name, key))
                for r in sorted(site.routes, key=lambda r: len(r.path), reverse=True)
            )
            routes = SiteRoutes(prefixes, fallback)
            for host in site.hosts:
                if host == "*":
                    self._any = routes
                elif host.startswith("*."):
                    self._wildcard[host[2:]] = routes
                else:
                    self._exact[host] = routes

    def match(self, host_header: bytes) -> SiteRoutes | None:
        """The site for a raw ``Host`` value (any case, optional port), or None."""
        try:
            return self._cache[host_header]
        except KeyError:
            pass
        found = self._lookup(host_header)
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[host_header] = found
        return found

    def _lookup(self, host_header: bytes) -> SiteRoutes | None:
        try:
            host = host_header.decode("ascii").lower()
        except UnicodeDecodeError:
            return None
        if host.startswith("["):  # IP literals are never site names
            return None
        host = host.rsplit(":", 1)[0] if ":" in host else host
        host = host.removesuffix(".")
        found = self._exact.get(host)
        if found is None and "." in host:
            found = self._wildcard.get(host.split(".", 1)[1])
        return found if found is not None else self._any


class Health(Protocol):
    """What a balancer asks of the pool."""

    def is_up(self, upstream: Upstream) -> bool: ...


class Balancer:
    """Round robin over a site's upstreams, skipping those marked down."""

    def __init__(self, upstreams: Sequence[Upstream], pool: Health) -> None:
        self._upstreams = tuple(upstreams)
        self._single = self._upstreams[0] if len(self._upstreams) == 1 else None
        self._pool = pool
        self._next = 0

    def pick(self, exclude: frozenset[Upstream] = frozenset()) -> Upstream | None:
        """The next healthy upstream; when all are down, still try one (it may be back)."""
        if self._single is not None and not exclude:
            return self._single
        count = len(self._upstreams)
        start = self._next
        self._next = (start + 1) % count
        fallback: Upstream | None = None
        for i in range(count):
            upstream = self._upstreams[(start + i) % count]
            if upstream in exclude:
                continue
            if self._pool.is_up(upstream):
                return upstream
            if fallback is None:
                fallback = upstream
        return fallback
