"""The DNS questions DNS-01 asks before it answers the CA (dnspython, synchronous).

* where the TXT record goes: ``_acme-challenge.<name>``, or where a CNAME there points (a
  delegation to a zone that exists only for validation, the acme-dns pattern);
* which zone holds that name (the closest SOA above it), when the configuration does not say;
* the zone's authoritative nameservers and their addresses;
* whether one of them serves the record yet, asked directly, without recursion, so no
  resolver cache can answer for it.

The resolver asked for the first three is the system's (``/etc/resolv.conf``) unless
``resolvers`` names others (split-horizon DNS, tests). Every question has a timeout; every
failure is a :class:`~acme_client.solvers.SolverError` that says which question failed.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rdatatype
import dns.resolver

from acme_client.solvers import SolverError

QUERY_TIMEOUT = 2.0  # seconds per DNS question
MAX_CNAMES = 8  # a longer chain is a loop or a mistake
DNS_PORT = 53


class DNSLookup:
    """Answers the questions above through one resolver configuration."""

    def __init__(self, resolvers: Sequence[tuple[str, int]] = (), timeout: float = QUERY_TIMEOUT):
        self.timeout = timeout
        self.resolver = dns.resolver.Resolver(configure=not resolvers)
        if resolvers:
            self.resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in resolvers
            ]
        self.resolver.lifetime = timeout * 2
        self.resolver.cache = None  # a record we just added must not be hidden by an old answer

    def follow_cnames(self, fqdn: str) -> str:
        """``fqdn``, or the end of the CNAME chain that starts there."""
        name = dns.name.from_text(fqdn)
        for _ in range(MAX_CNAMES):
            try:
                answer = self.resolver.resolve(name, "CNAME", raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return name.to_text()
            except dns.exception.DNSException as exc:
                raise SolverError(f"looking up a CNAME at {name}: {_reason(exc)}") from exc
            if answer.rrset is None:
                return name.to_text()
            name = answer.rrset[0].target
        raise SolverError(f"{fqdn}: more than {MAX_CNAMES} CNAMEs in a row")

    def zone_of(self, fqdn: str) -> str:
        """The zone that holds ``fqdn``: the closest name above it with an SOA record."""
        try:
            return dns.resolver.zone_for_name(fqdn, resolver=self.resolver).to_text()
        except dns.exception.DNSException as exc:
            raise SolverError(f"finding the zone of {fqdn} (its SOA): {_reason(exc)}") from exc

    def nameservers(self, zone: str) -> list[tuple[str, list[str]]]:
        """The zone's NS names, each with its IPv4 and IPv6 addresses."""
        try:
            names = [r.target.to_text() for r in self.resolver.resolve(zone, "NS")]
        except dns.exception.DNSException as exc:
            raise SolverError(f"finding the nameservers of {zone}: {_reason(exc)}") from exc
        found = []
        for name in sorted(names):
            addresses: list[str] = []
            for kind in ("A", "AAAA"):
                try:
                    answer = self.resolver.resolve(name, kind, raise_on_no_answer=False)
                except dns.exception.DNSException:
                    continue
                addresses += [r.address for r in answer.rrset or ()]
            if not addresses:
                raise SolverError(f"nameserver {name} of {zone} has no address")
            found.append((name, addresses))
        return found

    def serves(self, address: str, fqdn: str, value: str) -> bool:
        """Whether the nameserver at ``address`` answers TXT ``fqdn`` with ``value`` now
        (asked without recursion; an unreachable server does not serve it)."""
        query = dns.message.make_query(fqdn, "TXT")
        query.flags &= ~dns.flags.RD
        try:
            response, _ = dns.query.udp_with_fallback(
                query, address, port=DNS_PORT, timeout=self.timeout
            )
        except (dns.exception.DNSException, OSError):
            return False
        wanted = value.encode()
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT and any(
                b"".join(r.strings) == wanted for r in rrset
            ):
                return True
        return False


def _reason(exc: dns.exception.DNSException) -> str:
    return str(exc) or type(exc).__name__
