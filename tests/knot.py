"""A real authoritative DNS server for the DNS-01 tests: Knot DNS (Debian's ``knot``).

It listens on port 53 of a loopback address of its own (``127.53.x.y``: the whole of
127.0.0.0/8 is loopback on Linux), because the proxy checks propagation the way it must in
production, by asking each of the zone's nameservers on port 53; the zone's NS record points
there. Pebble's ``-dnsserver`` points there too, so the CA reads the very records the proxy
wrote. Updates must be signed with the TSIG key :data:`KEY_NAME`/:attr:`Knot.secret`.
Binding port 53 needs root (the tests run as root, like CI).
"""

from __future__ import annotations

import base64
import os
import random
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

from tests.support import stop_process

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KEY_NAME = "tlsproxy."
START_TIMEOUT = 10.0


def knot_available() -> bool:
    return os.access(KNOTD, os.X_OK) and os.geteuid() == 0


def _free_loopback_address() -> str:
    """A 127.53.x.y address whose port 53 is free (UDP and TCP)."""
    for _ in range(50):
        address = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((address, 53))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind((address, 53))
        except OSError:
            continue
        return address
    raise RuntimeError("no free loopback address for port 53")


class Knot:
    """knotd serving ``zones`` (name -> extra records, zone-file lines) with TSIG updates."""

    def __init__(self, directory: Path, zones: dict[str, list[str]]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.address = _free_loopback_address()
        self.secret = base64.b64encode(secrets.token_bytes(32)).decode()
        self.zones = zones
        for zone, records in zones.items():
            (directory / f"{zone}.zone").write_text(self._zone_file(zone, records))
        config = directory / "knot.conf"
        config.write_text(self._config())
        self.log_path = directory / "knot.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [KNOTD, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()

    def _zone_file(self, zone: str, records: list[str]) -> str:
        lines = [
            f"$ORIGIN {zone}.",
            "$TTL 5",
            f"@ SOA ns1.{zone}. hostmaster.{zone}. 1 60 60 3600 5",
            f"@ NS ns1.{zone}.",
            f"ns1 A {self.address}",
            *records,
        ]
        return "\n".join(lines) + "\n"

    def _config(self) -> str:
        zones = "".join(f"  - domain: {zone}\n    acl: update\n" for zone in self.zones)
        return f"""server:
    listen: {self.address}@53
    rundir: {self.directory}
log:
  - target: stderr
    any: info
database:
    storage: {self.directory}/db
key:
  - id: {KEY_NAME}
    algorithm: hmac-sha256
    secret: {self.secret}
acl:
  - id: update
    key: {KEY_NAME}
    action: update
template:
  - id: default
    storage: {self.directory}
    file: "%s.zone"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
{zones}"""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        zone = next(iter(self.zones))
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"knotd exited: {self.log_path.read_text()[-2000:]}")
            try:
                response = dns.query.udp(
                    dns.message.make_query(zone, "SOA"), self.address, timeout=0.5
                )
                if response.answer:
                    return
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("knotd did not answer")
            time.sleep(0.05)

    def txt(self, fqdn: str) -> list[str]:
        """The TXT values the server holds at ``fqdn`` now."""
        response = dns.query.udp(dns.message.make_query(fqdn, "TXT"), self.address, timeout=2)
        return [
            b"".join(record.strings).decode()
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for record in rrset
        ]

    def stop(self) -> None:
        stop_process(self.process)
