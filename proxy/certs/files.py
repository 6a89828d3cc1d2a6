"""A site's own ``cert``/``key`` files as a certificate source, re-read when they change.

Whoever renews them (certbot, cert-manager, a person) replaces the files; the maintenance
loop's look at every poll notices (one ``stat`` of each file) and serves the new pair. A
half-written or mismatched pair is logged once and the previous certificate keeps serving
until the pair is whole again.
"""

from __future__ import annotations

import logging
import os
import ssl
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.certs.protocol import CertificateError, CertificateStatus
from proxy.certs.store import CertEntry, make_entry
from proxy.config import Site

log = logging.getLogger("tlsproxy.certs")

Stamp = tuple[int, int, int, int, int, int]


class FileSource:
    """A site's ``cert``/``key`` pair."""

    def __init__(self, site: Site) -> None:
        if site.cert is None or site.key is None:
            raise CertificateError(site.name, "needs both cert and key")
        self.site = site
        self.cert_path = Path(site.cert)
        self.key_path = Path(site.key)
        self._loaded: Stamp | None = None  # files as last read into a served entry
        self._failed: Stamp | None = None  # files as last rejected (log each bad state once)

    @property
    def names(self) -> tuple[str, ...]:
        return self.site.hosts

    @property
    def identity(self) -> tuple[object, ...]:
        return ("file", self.site.hosts, self.site.cert, self.site.key)

    def _stamp(self) -> Stamp:
        c, k = os.stat(self.cert_path), os.stat(self.key_path)
        return (c.st_mtime_ns, c.st_size, c.st_ino, k.st_mtime_ns, k.st_size, k.st_ino)

    def load(self, serving: CertEntry | None = None) -> CertEntry:
        """Read and check both files. Raises :class:`CertificateError` naming the file."""
        try:
            stamp = self._stamp()  # before reading: a change during the read shows next time
            chain_pem = self.cert_path.read_bytes()
            key_pem = self.key_path.read_bytes()
        except OSError as exc:
            path = exc.filename or self.cert_path
            raise CertificateError(self.site.name, f"cannot read {path}: {exc.strerror}") from exc
        problem = _pair_problem(chain_pem, key_pem, self.cert_path, self.key_path)
        if problem is None:
            try:
                entry = make_entry(
                    self.site.hosts, chain_pem, key_pem, issuer="file", source=str(self.cert_path)
                )
            except (ssl.SSLError, ValueError) as exc:
                problem = f"cannot use {self.cert_path} with {self.key_path}: {exc}"
        if problem is not None:
            raise CertificateError(self.site.name, problem)
        self._loaded, self._failed = stamp, None
        return entry

    def look(self) -> CertEntry | None:
        """The pair again if either file changed since it was last read, else None."""
        try:
            stamp = self._stamp()
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._loaded:
            return None
        try:
            entry = self.load()
        except CertificateError as exc:
            if stamp is None or stamp != self._failed:
                log.warning("%s; keeping the previous certificate", exc)
            self._failed = stamp
            return None
        log.info("site %s: reloaded certificate from %s", self.site.name, self.cert_path)
        return entry

    def due(self, now: datetime) -> None:
        return None  # renewed by whoever writes the files

    def renew(self, now: datetime) -> None:
        return None

    def close(self) -> None:
        pass

    def status(self) -> CertificateStatus:
        try:
            leaf = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            not_after = leaf.not_valid_after_utc.isoformat(timespec="seconds")
        except (OSError, ValueError):
            not_after = "-"
        try:
            FileSource(self.site).load()
            error = None
        except CertificateError as exc:
            error = exc.reason
        return CertificateStatus(self.site.hosts, "file", not_after, "when the files change", error)


def _pair_problem(chain_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> str | None:
    """Why the pair is unusable, in words that name the file, or None."""
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
    except ValueError:
        return f"no PEM certificate in {cert_path}"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return f"no unencrypted PEM private key in {key_path}"
    if key.public_key() != leaf.public_key():
        return f"{key_path} is not the key of the certificate in {cert_path}"
    return None
