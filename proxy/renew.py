"""``tlsproxy renew``: obtain or renew ACME certificates now and write them to storage.

The challenge types are the configuration's (``[acme] challenges``); DNS-01 needs nothing
here but ``[acme.dns]``. HTTP-01 needs port 80 answered. When a proxy already runs on the configured
``http_listen`` address it answers from the token store it shares with us (the storage);
when the address is free, this command listens there itself for its duration. Running
proxies that use the storage pick the new certificate up within seconds (they poll it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from collections.abc import Sequence

from acme_client.challenges import StorageChallengeStore
from acme_client.location import open_storage
from acme_client.renewer import Outcome, Renewer, due_time
from acme_client.tlsalpn import ALPNChallenges
from proxy.certs.acme_sites import request_for, settings_for, uses_acme
from proxy.certs.solvers import solvers_for
from proxy.certs.store import normalize
from proxy.config import Config, Site
from proxy.http.router import Router
from proxy.http.upstream import UpstreamPool
from proxy.plain.redirect import HTTPResponder
from proxy.plain.server import PlainHTTPProtocol

log = logging.getLogger("tlsproxy")

LOCK_WAIT = 150.0  # seconds to wait while another process orders the same certificate
EXIT_FAILED = 1
EXIT_USAGE = 2


def select_sites(config: Config, hosts: Sequence[str]) -> tuple[list[Site], list[str]]:
    """The ACME sites to renew (all, or those having one of ``hosts``), and unknown hosts."""
    sites = [site for site in config.sites if uses_acme(site, config.tls)]
    if not hosts:
        return sites, []
    wanted = {normalize(h) for h in hosts}
    chosen = [site for site in sites if wanted & set(site.hosts)]
    known = {h for site in sites for h in site.hosts}
    return chosen, sorted(wanted - known)


def renew(config: Config, hosts: Sequence[str], force: bool) -> int:
    """The command: 0 when every selected certificate is valid and stored, else non-zero."""
    sites, unknown = select_sites(config, hosts)
    for host in unknown:
        print(
            f"tlsproxy: renew: {host}: no site with this host gets its certificate from ACME",
            file=sys.stderr,
        )
    if unknown:
        return EXIT_USAGE
    if not sites:
        print("tlsproxy: renew: no site gets its certificate from ACME; nothing to do")
        return 0
    return asyncio.run(_renew(config, sites, force))


async def _renew(config: Config, sites: list[Site], force: bool) -> int:
    storage = open_storage(config.tls.location)
    challenges = StorageChallengeStore(storage)
    http_listen = bool(config.server.http_listen)
    # TLS-ALPN-01 is answered by a proxy running on https_listen, from the shared storage
    solvers = solvers_for(config.acme, challenges, ALPNChallenges(storage), http_listen=http_listen)
    http01 = http_listen and "http-01" in config.acme.challenges
    servers = await _listen_http(config, challenges) if http01 else []
    try:
        renewer = Renewer(settings_for(config.acme), storage, solvers)
        status = 0
        for site in sites:
            try:
                outcome = await asyncio.to_thread(
                    renewer.renew,
                    request_for(site),
                    force=force,
                    respect_backoff=False,
                    lock_timeout=LOCK_WAIT,
                )
            except Exception as exc:  # storage trouble: say so, go on with the next site
                log.debug("renew failed", exc_info=True)
                print(f"tlsproxy: renew: {' '.join(site.hosts)}: {exc}", file=sys.stderr)
                status = EXIT_FAILED
                continue
            if not _report(site, outcome, config.tls.storage):
                status = EXIT_FAILED
        return status
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def _listen_http(config: Config, challenges: StorageChallengeStore) -> list[asyncio.Server]:
    """Answer HTTP-01 on every free ``http_listen`` address; a busy one is (we assume) a
    running proxy, which answers from the same storage."""
    loop = asyncio.get_running_loop()
    router = Router(config.sites, UpstreamPool(config.server.upstream_connect_timeout))
    responder = HTTPResponder(challenges, lambda: router, config.server.https_port)
    connections: set[asyncio.Transport] = set()
    servers = []
    for address in config.server.http_listen:
        try:
            server = await loop.create_server(
                lambda: PlainHTTPProtocol(responder, connections),
                address.host,
                address.port,
                reuse_address=True,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                log.info(
                    "%s is in use (a running proxy?): it answers the CA's HTTP-01 requests "
                    "from storage %s",
                    address,
                    config.tls.storage,
                )
            else:
                log.warning("cannot listen on %s for HTTP-01: %s", address, exc.strerror)
            continue
        log.info("answering HTTP-01 on %s while renewing", address)
        servers.append(server)
    return servers


def _report(site: Site, outcome: Outcome, storage: str) -> bool:
    """Print what happened to ``site``; False when it has no valid certificate now."""
    names = " ".join(site.hosts)
    certificate = outcome.certificate
    if outcome.status == "issued" and certificate is not None:
        print(
            f"{names}: new certificate, serial {certificate.info.serial}, valid until "
            f"{certificate.info.not_after.isoformat(timespec='seconds')}, renewal due "
            f"{due_time(certificate).isoformat(timespec='seconds')}; stored in {storage}"
        )
        return True
    if outcome.status == "fresh" and certificate is not None:
        print(
            f"{names}: not due (valid until "
            f"{certificate.info.not_after.isoformat(timespec='seconds')}, renewal due "
            f"{due_time(certificate).isoformat(timespec='seconds')}); --force renews anyway"
        )
        return True
    if outcome.status == "busy":
        print(
            f"tlsproxy: renew: {names}: another process has been ordering this certificate "
            f"for over {LOCK_WAIT:g} s; try again later",
            file=sys.stderr,
        )
        return False
    print(f"tlsproxy: renew: {names}: {outcome.error or outcome.status}", file=sys.stderr)
    return False
