"""Leaves from the internal CA as certificate sources: stored ones (``issuer = "internal"``)
and temporary ones (an ACME site's stand-in until its CA has issued, and the default
certificate when no site has one of its own).

Both are re-issued when :mod:`acme_client.schedule` says a leaf is due, and back off with
its retry delays when issuing fails (the old leaf keeps serving meanwhile).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from acme_client import schedule
from proxy.certs.internal_ca import DEFAULT_LEAF_LIFETIME, InternalCA
from proxy.certs.pemfiles import CERT_MODE, KEY_MODE, locked, make_private_dir, write_atomic
from proxy.certs.protocol import CertificateError, CertificateStatus
from proxy.certs.store import CertEntry, make_entry, normalize, safe_name

log = logging.getLogger("tlsproxy.certs")

TEMPORARY_LIFETIME = timedelta(days=7)
TEMPORARY_SOURCE = "temporary: waiting for the ACME certificate"

LoadCA = Callable[[str], InternalCA]  # site name (for errors) -> the CA; raises CertificateError


def leaf_directory(storage: Path, site: str) -> Path:
    """Where a site's internal leaf is stored: ``<storage>/certificates/internal/<site>``."""
    return storage / "certificates" / "internal" / safe_name(site)


class _Leaf:
    """What both kinds share: the leaf served, and when to issue the next one."""

    def __init__(self, names: tuple[str, ...], load_ca: LoadCA, lifetime: timedelta) -> None:
        self.names = names
        self.load_ca = load_ca
        self.lifetime = lifetime
        self.entry: CertEntry | None = None
        self.retry_at: datetime | None = None  # set after a failed issue
        self.failures = 0  # issues in a row that failed (the backoff's exponent)

    @property
    def site(self) -> str:
        return self.names[0]

    def issue_entry(self, now: datetime) -> CertEntry:
        """A leaf to serve (blocking); raises :class:`CertificateError`."""
        raise NotImplementedError

    def load(self, serving: CertEntry | None = None) -> CertEntry:
        self.entry = self.issue_entry(datetime.now(UTC))
        return self.entry

    def look(self) -> None:
        return None

    def due(self, now: datetime) -> datetime:
        if self.retry_at is not None:
            return self.retry_at
        if self.entry is None:
            return now
        return schedule.renewal_due(self.entry.not_before, self.entry.not_after)

    def renew(self, now: datetime) -> CertEntry | None:
        """A new leaf; on failure: log, keep serving the old one, retry with backoff."""
        try:
            entry = self.issue_entry(now)
        except CertificateError as exc:
            self.failures += 1
            delay = schedule.retry_delay(self.failures, self.lifetime)
            self.retry_at = datetime.now(UTC) + delay
            log.error("%s; retrying in %s", exc, delay)
            return None
        self.retry_at, self.failures = None, 0
        self.entry = entry
        return entry

    def close(self) -> None:
        pass


class InternalSource(_Leaf):
    """A site's leaf from the internal CA, stored so that restarts (and other workers) reuse
    it: ``<storage>/certificates/internal/<first host>/{cert.pem,key.pem}``."""

    def __init__(
        self,
        hosts: tuple[str, ...],
        load_ca: LoadCA,
        storage: Path,
        lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    ) -> None:
        super().__init__(hosts, load_ca, lifetime)
        self.directory = leaf_directory(storage, hosts[0])

    @property
    def identity(self) -> tuple[object, ...]:
        return ("internal", self.names, self.directory, self.lifetime)

    def issue_entry(self, now: datetime) -> CertEntry:
        """The stored leaf if at ``now`` it is still fresh and for the same names, else a new one.

        Checked under the storage lock, so when several workers find the leaf due, the first
        re-issues and the others adopt its leaf instead of issuing their own.
        """
        ca = self.load_ca(self.site)
        try:
            make_private_dir(self.directory)
            with locked(self.directory / ".lock"):
                entry = self._stored(ca, now)
                if entry is None:
                    chain_pem, key_pem = ca.issue(self.names, self.lifetime)
                    write_atomic(self.directory / "key.pem", key_pem, KEY_MODE)
                    write_atomic(self.directory / "cert.pem", chain_pem, CERT_MODE)
                    entry = self._entry(chain_pem, key_pem)
                    log.info("site %s: issued internal certificate %s", self.site, entry.serial)
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise CertificateError(self.site, f"internal certificate: {exc}") from exc
        return entry

    def _entry(self, chain_pem: bytes, key_pem: bytes) -> CertEntry:
        return make_entry(self.names, chain_pem, key_pem, issuer="internal", source="internal CA")

    def _stored(self, ca: InternalCA, now: datetime) -> CertEntry | None:
        try:
            chain_pem = (self.directory / "cert.pem").read_bytes()
            key_pem = (self.directory / "key.pem").read_bytes()
            leaf = x509.load_pem_x509_certificate(chain_pem)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            entry = self._entry(chain_pem, key_pem)
        except (OSError, ValueError, ssl.SSLError, x509.ExtensionNotFound):
            return None
        names = {normalize(n) for n in san.get_values_for_type(x509.DNSName)}
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        fresh = now < schedule.renewal_due(entry.not_before, entry.not_after)
        same = names == {normalize(h) for h in self.names}
        return entry if fresh and same and ca.issued(leaf) else None

    def status(self) -> CertificateStatus:
        try:
            leaf = x509.load_pem_x509_certificate((self.directory / "cert.pem").read_bytes())
        except (OSError, ValueError):
            return CertificateStatus(self.names, "internal", "-", "at start", None)
        start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        due = schedule.renewal_due(start, end)
        return CertificateStatus(self.names, "internal", _iso(end), _iso(due), None)


class TemporarySource(_Leaf):
    """A leaf from the internal CA that is never stored: it only stands in (for an ACME
    site until its CA has issued; as the default certificate when no site has one)."""

    def __init__(
        self, names: tuple[str, ...], load_ca: LoadCA, label: str = TEMPORARY_SOURCE
    ) -> None:
        super().__init__(names, load_ca, TEMPORARY_LIFETIME)
        self.label = label  # its entry's source, for logs (an ACME stand-in's: TEMPORARY_SOURCE)

    @property
    def identity(self) -> tuple[object, ...]:
        return ("temporary", self.names)

    def issue_entry(self, now: datetime) -> CertEntry:
        try:
            chain_pem, key_pem = self.load_ca(self.site).issue(self.names, self.lifetime)
            return make_entry(self.names, chain_pem, key_pem, issuer="internal", source=self.label)
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise CertificateError(self.site, f"temporary certificate: {exc}") from exc

    def status(self) -> CertificateStatus:
        entry = self.entry
        if entry is None:
            return CertificateStatus(self.names, "internal", "-", "at start", None)
        due = schedule.renewal_due(entry.not_before, entry.not_after)
        return CertificateStatus(self.names, "internal", _iso(entry.not_after), _iso(due), None)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")
