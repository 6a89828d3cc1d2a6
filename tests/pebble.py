"""Pebble, Let's Encrypt's test CA, on loopback for the ACME tests (../shared/recipes/pebble.md).

Validation is real: Pebble fetches ``http://<name>:<httpPort>/.well-known/acme-challenge/...``
from whatever listens on ``httpPort`` (the proxy's port-80 listener in the tests). Names
resolve through a tiny DNS server (:class:`LoopbackDNS`) answering A 127.0.0.1 for every name
and nothing for AAAA, so no /etc/hosts editing. Pebble's own HTTPS API gets a throwaway CA
(``api_ca``), trusted only by the clients we point at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from dnslib import QTYPE, RR, A, DNSRecord  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSLogger, DNSServer  # type: ignore[import-untyped]

from tests.support import ProxyProcess, free_port, stop_process, to_toml, wait_for_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
START_TIMEOUT = 15.0


def pebble_available() -> bool:
    return os.access(PEBBLE, os.X_OK)


class _LoopbackResolver(BaseResolver):  # type: ignore[misc]
    """Every name is 127.0.0.1; AAAA answers are empty (Pebble would not fall back to IPv4)."""

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = request.q.qname
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=5))
        return reply


class LoopbackDNS:
    """A UDP DNS server on 127.0.0.1 in a thread (dnslib)."""

    def __init__(self) -> None:
        self.port = _free_udp_port()
        quiet = DNSLogger(logf=lambda _message: None)
        self._server = DNSServer(
            _LoopbackResolver(), port=self.port, address="127.0.0.1", logger=quiet
        )
        self._server.start_thread()
        self._wait_ready()

    def _wait_ready(self) -> None:
        query = DNSRecord.question("ready.test", "A").pack()
        deadline = time.monotonic() + 5
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            while time.monotonic() < deadline:
                sock.sendto(query, ("127.0.0.1", self.port))
                try:
                    sock.recvfrom(512)
                    return
                except OSError:
                    continue
        raise TimeoutError("the test DNS server did not answer")

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Pebble:
    """One Pebble process; ``start`` again after ``stop`` gives a new CA on the same ports."""

    directory: Path
    http_port: int  # where Pebble's validator connects (the proxy's http_listen port)
    dns_port: int
    validity: int | None = None  # certificate lifetime in seconds (None: Pebble's 5 years)
    nonce_reject: int = 0  # percent of good nonces Pebble rejects as badNonce
    eab_keys: dict[str, str] | None = None  # kid -> base64url HMAC key; EAB required if set
    port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    dns_host: str = "127.0.0.1"  # with dns_port: the DNS server Pebble's validator asks
    tls_port: int | None = None  # where it validates TLS-ALPN-01 (the proxy's HTTPS port)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.api_ca))
        leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
        leaf.private_key_pem.write_to_path(str(self.directory / "api-key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(self.directory / "api-cert.pem"))

    @property
    def api_ca(self) -> Path:
        """The CA of Pebble's HTTPS API (``[acme] ca_bundle``)."""
        return self.directory / "api-ca.pem"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def log_path(self) -> Path:
        return self.directory / "pebble.log"

    def start(self) -> Pebble:
        settings: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.directory / "api-cert.pem"),
            "privateKey": str(self.directory / "api-key.pem"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port or free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab_keys is not None,
        }
        if self.eab_keys is not None:
            settings["externalAccountMACKeys"] = self.eab_keys
        if self.validity is not None:
            settings["certificateValidityPeriod"] = self.validity
        config = self.directory / "pebble.json"
        config.write_text(json.dumps({"pebble": settings}))
        env = {key: value for key, value in os.environ.items() if not key.startswith("PEBBLE_")} | {
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": str(self.nonce_reject),
            "PEBBLE_AUTHZREUSE": "0",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [PEBBLE, "-config", str(config), "-dnsserver", f"{self.dns_host}:{self.dns_port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.starts += 1
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"pebble exited: {self.log_path.read_text()[-2000:]}")
            try:
                self._get(self.url)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.api_ca))
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            body: bytes = response.read()
            return body

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def roots(self) -> bytes:
        """Pebble's root (regenerated at every start): what clients must trust."""
        return self._get(f"https://127.0.0.1:{self.management_port}/roots/0")

    def write_roots(self, path: Path) -> Path:
        path.write_bytes(self.roots())
        return path

    def orders(self) -> int:
        """Orders Pebble created, over every start (counted from its log)."""
        return len(re.findall(r"Added order ", self.log()))

    def issued(self) -> int:
        """Certificates Pebble issued, over every start."""
        return len(re.findall(r"Issued certificate serial ", self.log()))

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def certificate_status(self, serial_hex: str) -> str:
        body = self._get(
            f"https://127.0.0.1:{self.management_port}/cert-status-by-serial/{serial_hex}"
        )
        return str(json.loads(body).get("Status"))


def acme_config(
    directory: Path,
    pebble: Pebble,
    sites: Sequence[Mapping[str, object]],
    *,
    https_port: int | None = None,
    storage: Path | None = None,
    server: dict[str, Any] | None = None,
    acme: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
) -> tuple[Path, int]:
    """Write a proxy config using ``pebble`` (its http_listen is Pebble's ``httpPort``)."""
    https_port = https_port or free_port()
    settings: dict[str, Any] = {
        "https_listen": [f"127.0.0.1:{https_port}"],
        "http_listen": [f"127.0.0.1:{pebble.http_port}"],
        "https_port": https_port,
        "admin_listen": "",
        "shutdown_timeout": 5,
    } | (server or {})
    config = {
        "server": settings,
        "tls": {"storage": str(storage or directory / "data"), "issuer": "acme"} | (tls or {}),
        "acme": _acme_table(pebble, acme or {}),
        "sites": [dict(site) for site in sites],
    }
    path = directory / "proxy.toml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(config))
    return path, https_port


def _acme_table(pebble: Pebble, extra: dict[str, Any]) -> dict[str, Any]:
    """``[acme]`` for ``pebble``, with ``extra`` keys; ``issuers`` in ``extra`` replace it."""
    if "issuers" in extra:
        return {"email": "ops@a.test"} | extra
    return {"directory": pebble.url, "ca_bundle": str(pebble.api_ca), "email": "ops@a.test"} | extra


def issuer(pebble: Pebble) -> dict[str, str]:
    """One ``[[acme.issuers]]`` entry for ``pebble``."""
    return {"directory": pebble.url, "ca_bundle": str(pebble.api_ca)}


def start_proxy(config: Path, https_port: int, http_port: int) -> ProxyProcess:
    """``python -m proxy run`` on a config from :func:`acme_config`; waits until it listens."""
    log_path = config.parent / "proxy.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proxy = ProxyProcess(config.parent, https_port, http_port, process, log_path)
    wait_for_port(https_port, process=process)
    return proxy


def served_certificate(port: int, host: str, cafile: Path | None = None) -> dict[str, Any]:
    """The certificate the proxy serves for ``host``; verified against ``cafile`` if given."""
    if cafile is not None:
        context = ssl.create_default_context(cafile=str(cafile))
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        if cafile is not None:
            cert = tls.getpeercert()
            assert cert is not None
            return dict(cert)
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        from cryptography import x509

        leaf = x509.load_der_x509_certificate(der)
        common = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return {"serialNumber": f"{leaf.serial_number:X}", "issuer_cn": str(common[0].value)}
