"""The challenge solvers a configuration asks for, in its order of preference.

``[acme] challenges`` lists the types; each becomes an ``acme_client`` solver when its
prerequisites are there, and is skipped with a log line when they are not (HTTP-01 with no
``http_listen``: nothing would answer the CA). TLS-ALPN-01 keys go to shared storage, where
every process's HTTPS listener finds them (:mod:`proxy.certs.alpn`). DNS-01's provider and
lookups come from ``[acme.dns]``; its TSIG secret is read here, from the file if it is in
one, and goes nowhere but into the provider.
"""

from __future__ import annotations

import logging
from pathlib import Path

from acme_client.dns01 import DNS01Solver, DNSProvider
from acme_client.dnsexec import ExecProvider
from acme_client.dnslookup import DNSLookup
from acme_client.interfaces import ChallengeStore
from acme_client.rfc2136 import RFC2136Provider
from acme_client.solvers import HTTP01Solver, Solver
from acme_client.tlsalpn import ALPNChallenges, TLSALPN01Solver
from proxy.config import ACMEConfig, DNSConfig

log = logging.getLogger("tlsproxy.certs")


def solvers_for(
    acme: ACMEConfig,
    challenges: ChallengeStore,
    alpn: ALPNChallenges | None,
    *,
    http_listen: bool,
) -> list[Solver]:
    """One solver per usable type of ``acme.challenges``, in that order.

    Raises ``OSError``/``ValueError`` when ``[acme.dns]``'s secret file cannot be used.
    """
    found: list[Solver] = []
    for kind in acme.challenges:
        if kind == "http-01" and not http_listen:
            log.warning(
                "acme.challenges: http-01 skipped: server.http_listen is empty, so nothing "
                "answers the CA on port 80"
            )
        elif kind == "http-01":
            found.append(HTTP01Solver(challenges))
        elif kind == "dns-01" and acme.dns is not None:
            found.append(dns_solver(acme.dns))
        elif kind == "tls-alpn-01" and alpn is not None:
            found.append(TLSALPN01Solver(alpn))
    return found


def dns_solver(dns: DNSConfig) -> DNS01Solver:
    """DNS-01 through the configured provider, checking propagation with the resolvers."""
    provider: DNSProvider
    if dns.provider == "exec":
        provider = ExecProvider(dns.command)
    else:
        assert dns.server is not None  # the loader requires it
        secret = dns.tsig_secret or read_secret(dns.tsig_secret_file)
        provider = RFC2136Provider(
            dns.server.host, dns.server.port, dns.tsig_key, secret, dns.tsig_algorithm
        )
    lookup = DNSLookup([(a.host, a.port) for a in dns.resolvers])
    return DNS01Solver(provider, lookup, zone=dns.zone, propagation_timeout=dns.propagation_timeout)


def read_secret(path: str) -> str:
    """A secret file's content without surrounding whitespace (a trailing newline)."""
    return Path(path).read_text().strip()
