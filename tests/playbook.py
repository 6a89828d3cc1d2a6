"""Scripted dialogues with the data path, in memory: events in, the exact actions out.

An :class:`~proxy.http.exchange.Exchange` acts only through its ports (its Downstream, its
upstream link, the pool); here each port is a recorder that appends what it was asked to
do to one shared list, in order. A test plays events (a request head, a response, the
clock moving) and compares the list of actions with what it expects, the way mitmproxy's
playbook tests drive its sans-I/O layers. Sockets, event loops and timers take no part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from proxy.config import ServerConfig, Site, Upstream
from proxy.http.exchange import Exchange, UpstreamLink
from proxy.http.h1 import framing
from proxy.http.message import HTTPError, Request, RequestHead, Response
from proxy.http.policy import Peer
from proxy.http.router import Router

Action = tuple[Any, ...]
APP = Upstream("127.0.0.1", 8000)
SPARE = Upstream("127.0.0.1", 8001)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class Link:
    """An upstream connection that records what the exchange does with it."""

    def __init__(self, actions: list[Action], upstream: Upstream, reused: bool) -> None:
        self.actions = actions
        self.upstream = upstream
        self.reused = reused
        self.answered = False

    def attach(self, exchange: Exchange, head_request: bool) -> None:
        self.actions.append(("link.attach", self.upstream.port, head_request))

    def send_request(self, request: Request) -> None:
        head = framing.request_head(request)
        self.actions.append(("link.send_request", head.split(b"\r\n", 1)[0]))
        self.head = head

    def send_body(self, data: bytes) -> None:
        self.actions.append(("link.send_body", data))

    def send_end(self) -> None:
        self.actions.append(("link.send_end",))

    def pause_reading(self) -> None:
        self.actions.append(("link.pause_reading",))

    def resume_reading(self) -> None:
        self.actions.append(("link.resume_reading",))

    def close(self) -> None:
        self.actions.append(("link.close",))

    def detach(self) -> asyncio.Transport:
        self.actions.append(("link.detach",))
        return asyncio.Transport()


class Pool:
    """Connections to give out (``idle``: what ``take`` finds), recording every call."""

    def __init__(self, actions: list[Action]) -> None:
        self.actions = actions
        self.connect_timeout = 5.0
        self.idle: list[Link] = []
        self.down: set[Upstream] = set()

    def take(self, upstream: Upstream) -> UpstreamLink | None:
        found = next((link for link in self.idle if link.upstream == upstream), None)
        if found is not None:
            self.idle.remove(found)
        self.actions.append(("pool.take", upstream.port, found is not None))
        return found

    def open(self, upstream: Upstream, exchange: Exchange) -> None:
        self.actions.append(("pool.open", upstream.port))

    def release(self, link: UpstreamLink, reusable: bool) -> None:
        self.actions.append(("pool.release", reusable))

    def mark_down(self, upstream: Upstream, reason: str) -> None:
        self.down.add(upstream)
        self.actions.append(("pool.mark_down", upstream.port))

    def is_up(self, upstream: Upstream) -> bool:
        return upstream not in self.down


class Downstream:
    """The client's side of the exchanges, recording what each answers."""

    def __init__(self, actions: list[Action]) -> None:
        self.actions = actions

    def respond_interim(self, response: Response) -> None:
        self.actions.append(("client.interim", response.status))

    def respond(self, exchange: Exchange, response: Response) -> None:
        self.actions.append(("client.respond", response.status))

    def respond_body(self, data: bytes) -> None:
        self.actions.append(("client.body", data))

    def respond_end(self, exchange: Exchange) -> None:
        self.actions.append(("client.end",))

    def answer_error(self, exchange: Exchange, error: HTTPError) -> None:
        self.actions.append(("client.error", error.status))

    def cut(self, exchange: Exchange) -> None:
        self.actions.append(("client.cut",))

    def pause_request(self, exchange: Exchange) -> None:
        self.actions.append(("client.pause_request",))

    def resume_request(self, exchange: Exchange) -> None:
        self.actions.append(("client.resume_request",))

    def upgrade(self, exchange: Exchange, link: UpstreamLink, rest: bytes) -> None:
        self.actions.append(("client.upgrade", rest))


class Context:
    """What the exchanges share: settings, a real router over ``upstreams``, the pool."""

    def __init__(
        self, actions: list[Action], upstreams: Sequence[Upstream], settings: ServerConfig
    ) -> None:
        self.settings = settings
        self.pool = Pool(actions)
        self.router = Router([Site(hosts=("app.test",), upstreams=tuple(upstreams))], self.pool)
        self.access_log = None
        self.loop = Clock()


class Client:
    """The client connection the exchanges belong to."""

    def __init__(self) -> None:
        self.peer = Peer.from_address("192.0.2.7", 443, [])
        self.sni: str | None = "app.test"
        self.sni_host = b""


class Playbook:
    """One exchange with recording ports; ``take()`` returns the actions since last asked."""

    def __init__(
        self,
        *,
        upstreams: Sequence[Upstream] = (APP,),
        pooled: bool = False,
        settings: ServerConfig | None = None,
    ) -> None:
        self.actions: list[Action] = []
        self.context = Context(self.actions, upstreams, settings or ServerConfig())
        if pooled:
            self.context.pool.idle.append(Link(self.actions, upstreams[0], reused=True))
        self.downstream = Downstream(self.actions)
        self.client = Client()
        self.exchange = self.new_exchange()

    def new_exchange(self) -> Exchange:
        return Exchange(self.context, self.downstream, self.client, self.context.loop.now)

    @property
    def clock(self) -> Clock:
        return self.context.loop

    def take(self) -> list[Action]:
        taken = list(self.actions)
        self.actions.clear()
        return taken

    def link(self, upstream: Upstream = APP, reused: bool = False) -> Link:
        return Link(self.actions, upstream, reused)


def head(
    target: bytes = b"/",
    method: bytes = b"GET",
    fields: Sequence[tuple[bytes, bytes]] = (),
    version: bytes = b"1.1",
) -> RequestHead:
    return RequestHead(method, target, version, [(b"Host", b"app.test"), *fields])


def ok(body: bytes = b"ok") -> list[tuple[bytes, bytes]]:
    return [(b"Content-Length", b"%d" % len(body))]
