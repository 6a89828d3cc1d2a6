"""DNS-01 (RFC 8555 section 8.4): a TXT record proves control of a name, wildcards included.

:class:`DNS01Solver` is the protocol logic; a :class:`DNSProvider` only adds and removes one
TXT value (RFC 2136 updates in :mod:`acme_client.rfc2136`, a user's script in
:mod:`acme_client.dnsexec`). For each challenge:

1. present: the record goes where ``_acme-challenge.<name>`` leads (a CNAME there is
   followed), in the zone the configuration names or the one its SOA says;
2. wait: until every authoritative nameserver of that zone serves the value (bounded by
   ``propagation_timeout``), because the CA may ask any of them, once;
3. cleanup: that one value is removed again (an apex and its wildcard share a record name,
   each with its own value, so a record is never deleted whole).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from typing import Protocol

from acme_client.dnslookup import DNSLookup
from acme_client.solvers import Challenge, SolverError

log = logging.getLogger("tlsproxy.acme")

PROPAGATION_TIMEOUT = 120.0  # seconds for a record to reach every authoritative nameserver
PROPAGATION_POLL = 0.5  # seconds between looks
RECORD_TTL = 60  # seconds; short, as the record lives for one validation


def txt_value(key_authorization: str) -> str:
    """The TXT value: base64url (no padding) of the key authorization's SHA-256."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def record_name(name: str) -> str:
    """Where the CA looks: ``_acme-challenge.<name>.`` (a wildcard's ``*.`` is not part of
    an authorization's identifier)."""
    return f"_acme-challenge.{name.lower().removeprefix('*.').rstrip('.')}."


class DNSProvider(Protocol):
    """Adds and removes one TXT value at a DNS host."""

    def add(self, zone: str, fqdn: str, value: str, ttl: int) -> None:
        """Add ``value`` to the TXT records at ``fqdn`` (in ``zone``); :class:`SolverError`."""
        ...

    def remove(self, zone: str, fqdn: str, value: str) -> None:
        """Remove that value again (others at the same name stay)."""
        ...

    def describe(self) -> str:
        """Where the records go, for the log: never a secret."""
        ...


class DNS01Solver:
    """Solves DNS-01 challenges through a provider, waiting for the zone's nameservers."""

    challenge_type = "dns-01"

    def __init__(
        self,
        provider: DNSProvider,
        lookup: DNSLookup,
        *,
        zone: str = "",
        propagation_timeout: float = PROPAGATION_TIMEOUT,
        poll: float = PROPAGATION_POLL,
    ) -> None:
        self.provider = provider
        self.lookup = lookup
        self.zone = zone
        self.propagation_timeout = propagation_timeout
        self.poll = poll
        self._placed: dict[tuple[str, str], tuple[str, str]] = {}  # (name, token) -> fqdn, zone
        self._lock = threading.Lock()  # several orders may run at once, in threads

    def present(self, challenge: Challenge) -> None:
        fqdn = self.lookup.follow_cnames(record_name(challenge.name))
        zone = _absolute(self.zone) if self.zone else self.lookup.zone_of(fqdn)
        self.provider.add(zone, fqdn, txt_value(challenge.key_authorization), RECORD_TTL)
        with self._lock:
            self._placed[challenge.name, challenge.token] = (fqdn, zone)
        log.info(
            "dns-01 for %s%s: TXT record %s added (zone %s, %s)",
            "*." if challenge.wildcard else "",
            challenge.name,
            fqdn,
            zone,
            self.provider.describe(),
        )

    def wait(self, challenge: Challenge, cancel: threading.Event | None = None) -> None:
        fqdn, zone = self._where(challenge)
        value = txt_value(challenge.key_authorization)
        started = time.monotonic()
        deadline = started + self.propagation_timeout
        servers = self.lookup.nameservers(zone)
        while True:
            missing = [
                name
                for name, addresses in servers
                if not any(self.lookup.serves(a, fqdn, value) for a in addresses)
            ]
            if not missing:
                log.info(
                    "dns-01 for %s: %s served by %s after %.1f s",
                    challenge.name,
                    fqdn,
                    ", ".join(name for name, _ in servers),
                    time.monotonic() - started,
                )
                return
            if time.monotonic() >= deadline:
                raise SolverError(
                    f"the TXT record {fqdn} was not served by {', '.join(missing)} within "
                    f"{self.propagation_timeout:g} s (propagation_timeout)"
                )
            delay = min(self.poll, max(deadline - time.monotonic(), 0))
            if cancel is not None:
                if cancel.wait(delay):
                    raise SolverError("stopped while waiting for DNS propagation")
            else:
                time.sleep(delay)

    def cleanup(self, challenge: Challenge) -> None:
        with self._lock:
            placed = self._placed.pop((challenge.name, challenge.token), None)
        if placed is None:
            return  # present failed: nothing was added
        fqdn, zone = placed
        self.provider.remove(zone, fqdn, txt_value(challenge.key_authorization))
        log.info("dns-01 for %s: TXT record %s removed", challenge.name, fqdn)

    def _where(self, challenge: Challenge) -> tuple[str, str]:
        with self._lock:
            placed = self._placed.get((challenge.name, challenge.token))
        if placed is None:
            raise SolverError(f"dns-01 for {challenge.name}: no record was presented")
        return placed


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."
