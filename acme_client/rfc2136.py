"""DNS-01 records through RFC 2136 dynamic updates signed with TSIG (RFC 8945), over TCP.

BIND, Knot, PowerDNS and many hosted DNS services accept them, so one provider reaches most
DNS hosts without an API client per vendor. The TSIG secret stays in the key object: every
message here names the server, the zone and the key's *name*, never the secret.
"""

from __future__ import annotations

import base64
import binascii
import socket

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.update

from acme_client.solvers import SolverError

ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5")
UPDATE_TIMEOUT = 10.0  # seconds for one update


class RFC2136Provider:
    """Adds and removes TXT values at ``host:port`` with updates signed by one TSIG key."""

    def __init__(
        self,
        host: str,
        port: int,
        key_name: str,
        secret: str,
        algorithm: str = "hmac-sha256",
        timeout: float = UPDATE_TIMEOUT,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown TSIG algorithm {algorithm!r}")
        try:
            base64.b64decode(secret, validate=True)
        except binascii.Error:
            raise ValueError("the TSIG secret is not base64") from None
        self.host = host
        self.port = port
        self.key_name = key_name
        self.timeout = timeout
        self._key = dns.tsig.Key(key_name, secret, algorithm)

    def describe(self) -> str:
        return f"RFC 2136 update to {self.host}:{self.port}, TSIG key {self.key_name}"

    def add(self, zone: str, fqdn: str, value: str, ttl: int) -> None:
        update = dns.update.UpdateMessage(zone, keyring=self._key)
        update.add(fqdn, ttl, _txt(value))
        self._send(update, zone, "adding")

    def remove(self, zone: str, fqdn: str, value: str) -> None:
        update = dns.update.UpdateMessage(zone, keyring=self._key)
        update.delete(fqdn, _txt(value))
        self._send(update, zone, "removing")

    def _send(self, update: dns.message.Message, zone: str, doing: str) -> None:
        where = f"{self.host}:{self.port}"
        try:
            address = str(
                socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][4][0]
            )
            response = dns.query.tcp(update, address, port=self.port, timeout=self.timeout)
        except dns.tsig.PeerBadKey:
            raise SolverError(
                f"rfc2136: {where} does not know the TSIG key {self.key_name!r} (BADKEY): "
                "check tsig_key"
            ) from None
        except dns.tsig.PeerBadSignature:
            raise SolverError(
                f"rfc2136: {where} rejected the signature of TSIG key {self.key_name!r} "
                "(BADSIG): check tsig_secret and tsig_algorithm"
            ) from None
        except dns.tsig.PeerBadTime:
            raise SolverError(f"rfc2136: {where}: our clock differs from the server's") from None
        except (OSError, dns.exception.DNSException) as exc:
            raise SolverError(
                f"rfc2136: {doing} a TXT record at {where} failed: {exc or type(exc).__name__}"
            ) from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise SolverError(
                f"rfc2136: {where} refused {doing} a TXT record in zone {zone} "
                f"({dns.rcode.to_text(rcode)}): may TSIG key {self.key_name!r} update it?"
            )


def _txt(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()])
