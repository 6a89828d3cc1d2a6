"""Sites from the labels of running containers, kept current from the Docker Engine API.

The provider lists the running containers, inspects those whose labels ask to be routed,
turns their labels into sites
(:mod:`proxy.providers.labels`) and hands the whole list to ``publish`` whenever it
changes; the server merges it with the file's sites and swaps its router in one step. It
never edits routes piecemeal, so a missed event cannot leave a stale one: every event
(a container started, died, was paused...) triggers a fresh list, and so does a quiet
``resync`` interval, as a catch-up. The event stream is asked to replay from a moment
before the first list, so nothing that happens between the two is lost.

If the API goes away, the last published sites stay (traffic keeps flowing to the
containers already known), one warning is logged, and the provider reconnects with
backoff; it logs again when the API is back.

Why aiodocker (aio-libs, on aiohttp): it speaks the Engine API over ``unix://`` and
``tcp://`` (with TLS client certificates), streams ``/events`` as an async iterator that
cancels cleanly, and follows API versions, where hand-written HTTP over a socket would
have to do all of that again. It is imported only when ``[docker]`` is configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from proxy.config import DockerConfig
from proxy.providers.labels import Container, DiscoveredSite, discover, wanted
from proxy.tasks import spawn

if TYPE_CHECKING:
    import aiodocker

log = logging.getLogger("tlsproxy.docker")

Publish = Callable[[tuple[DiscoveredSite, ...]], Awaitable[bool]]  # False: not applied

RESYNC = 30.0  # seconds: a full list even when no event came
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0  # reconnect delays, doubling, with jitter
REQUEST_TIMEOUT = 10.0  # one list call; the event stream has none


class DockerProvider:
    """Follows one Docker (or podman) API endpoint until cancelled."""

    def __init__(self, settings: DockerConfig, publish: Publish, *, resync: float = RESYNC):
        self.settings = settings
        self._publish = publish
        self._resync = resync
        self.sites: tuple[DiscoveredSite, ...] | None = None  # as last published
        self._problems: set[str] = set()  # logged already; logged again once gone and back
        self._down = False  # the API is unreachable, and that has been logged
        self._synced = False  # a list succeeded since the last failure
        self._inspected: dict[str, Container] = {}  # running and routed, by container id

    async def run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                async with self._client() as docker:
                    await self._follow(docker)
            except Exception as exc:  # any failure of the API or the connection: retry
                self._lost(exc)
            if self._synced:  # it was up: the first retry is soon
                backoff, self._synced = BACKOFF_MIN, False
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _client(self) -> aiodocker.Docker:
        import aiodocker
        import aiohttp

        endpoint, context = self.settings.endpoint, None
        if endpoint.startswith("tcp://"):
            address = endpoint.removeprefix("tcp://")
            settings = self.settings
            if settings.tls_ca or settings.tls_cert:
                context = ssl.create_default_context(cafile=settings.tls_ca or None)
                if settings.tls_cert:
                    context.load_cert_chain(settings.tls_cert, settings.tls_key)
                endpoint = f"https://{address}"
            else:
                endpoint = f"http://{address}"
        return aiodocker.Docker(
            url=endpoint,
            ssl_context=context,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )

    async def _follow(self, docker: aiodocker.Docker) -> None:
        """List, publish, then wait for events (or the resync interval) and list again."""
        subscriber = docker.events.subscribe(create_task=False)  # type: ignore[no-untyped-call]
        since = int(time.time()) - 1  # replay what happens while the first list runs
        stream = spawn(
            docker.events.run(since=since, filters=json.dumps({"type": ["container"]})),
            name="docker events",
        )
        try:
            await self._sync(docker)
            while True:
                try:
                    async with asyncio.timeout(self._resync):
                        event = await subscriber.get()
                except TimeoutError:  # quiet for a while: catch up, networks included
                    await self._sync(docker, fresh=True)
                    continue
                while event is not None and not subscriber.queue.empty():  # a burst: one list
                    event = subscriber.queue.get_nowait()
                if event is None:  # aiodocker's end-of-stream mark
                    error = stream.exception() if stream.done() else None
                    raise error if error is not None else ConnectionError("event stream ended")
                await self._sync(docker)
        finally:
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)

    async def _sync(self, docker: aiodocker.Docker, *, fresh: bool = False) -> None:
        """List the running containers; inspect the ones whose labels ask to be routed
        (their details are kept by id: they do not change while a container runs, except
        its networks, which ``fresh`` re-reads); publish the sites if they changed."""
        listed = await docker.containers.list()
        running: dict[str, Container] = {}
        for item in listed:
            labels = _field(item, "Labels") or {}
            if not wanted(labels, self.settings):
                continue
            known = None if fresh else self._inspected.get(item.id)
            if known is None:
                known = Container.from_inspect(await item.show())
            running[item.id] = known
        self._inspected = running
        self._synced = True
        if self._down:
            log.info("Docker API at %s answers again", self.settings.endpoint)
            self._down = False
        sites, problems = discover(running.values(), self.settings)
        for problem in sorted(set(problems) - self._problems):
            log.warning("%s", problem)
        self._problems = set(problems)
        if sites != self.sites and await self._publish(sites):
            self.sites = sites  # not applied: offered again at the next list

    def _lost(self, exc: Exception) -> None:
        if self._down:
            log.debug("Docker API at %s: %s", self.settings.endpoint, exc)
            return
        self._down = True
        kept = len(self.sites or ())
        log.warning(
            "Docker API at %s unreachable (%s): keeping the %d discovered site(s); "
            "reconnecting with backoff",
            self.settings.endpoint,
            exc or type(exc).__name__,
            kept,
        )


def _field(container: Any, key: str) -> Any:
    """One field of a container list item (aiodocker offers item access only)."""
    try:
        return container[key]
    except KeyError:
        return None
