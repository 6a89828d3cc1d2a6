"""The storage layout of ACME certificates and the metadata kept beside each one.

Per CA (``<ca>`` comes from the directory URL: ``acme-v02.api.letsencrypt.org-directory``)::

    acme/<ca>/account/key.pem, account.json
    acme/<ca>/certificates/<site>/cert.pem   full chain, leaf first
    acme/<ca>/certificates/<site>/key.pem    0600
    acme/<ca>/certificates/<site>/meta.json  names, validity, last attempt/error, next attempt
    locks/acme-<ca>-<site>.lock              held while one process orders for the site

A new certificate is written key, chain, then metadata. Readers accept a set only when the
three agree (the key matches the leaf, the serial matches the metadata), so a reader that
races a writer sees the previous complete set or nothing new, never a mixed pair.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from acme_client.keys import CertificateInfo, inspect, key_matches
from acme_client.storage import Storage


def ca_id(directory_url: str) -> str:
    """A directory name for a CA: host, port and path of its directory URL."""
    url = urlsplit(directory_url)
    parts = [url.hostname or "ca"]
    if url.port:
        parts.append(str(url.port))
    parts += [p for p in url.path.split("/") if p]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts).lower())


@dataclass(frozen=True, slots=True)
class Metadata:
    """``meta.json``: what is known about a site's certificate and its last order."""

    names: tuple[str, ...]
    directory: str
    serial: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    issuer: str | None = None  # the issuing CA's name
    issued_at: datetime | None = None
    last_attempt: datetime | None = None
    last_error: str | None = None  # "<CA error type>: <detail>" of the last failure
    failures: int = 0  # consecutive failed attempts (backoff exponent)
    next_attempt: datetime | None = None  # retry time after a failure
    ari_renew_at: datetime | None = None  # from the CA's renewalInfo (RFC 9773), if offered
    ari_next_check: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept on rewrite

    @property
    def lifetime(self) -> float | None:
        if self.not_before is None or self.not_after is None:
            return None
        return (self.not_after - self.not_before).total_seconds()

    def with_certificate(self, info: CertificateInfo, now: datetime) -> Metadata:
        """After a successful order: the new certificate's facts, failures cleared."""
        return replace(
            self,
            serial=info.serial,
            not_before=info.not_before,
            not_after=info.not_after,
            issuer=info.issuer,
            issued_at=now,
            last_attempt=now,
            last_error=None,
            failures=0,
            next_attempt=None,
            ari_renew_at=None,
            ari_next_check=None,
        )

    def to_json(self) -> bytes:
        data: dict[str, Any] = dict(self.extra)
        for key, value in asdict(self).items():
            if key == "extra":
                continue
            if isinstance(value, datetime):
                value = value.isoformat(timespec="seconds")
            elif isinstance(value, tuple):
                value = list(value)
            data[key] = value
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Metadata:
        """Parse ``meta.json``; ``ValueError`` when it is not ours."""
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("names"), list):
            raise ValueError("not an ACME metadata file")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values: dict[str, Any] = {}
        for key in known & data.keys():
            value = data[key]
            if key in _TIMES and value is not None:
                value = _time(value)
            values[key] = value
        values["names"] = tuple(str(n) for n in data["names"])
        values["failures"] = int(values.get("failures") or 0)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})


_TIMES = frozenset(
    {
        "not_before",
        "not_after",
        "issued_at",
        "last_attempt",
        "next_attempt",
        "ari_renew_at",
        "ari_next_check",
    }
)


def _time(text: object) -> datetime:
    when = datetime.fromisoformat(str(text))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    """A consistent chain + key + metadata set read from storage."""

    chain_pem: bytes
    key_pem: bytes
    meta: Metadata
    info: CertificateInfo

    def covers(self, names: tuple[str, ...]) -> bool:
        return {n.lower() for n in names} <= self.info.names

    def valid_at(self, now: datetime) -> bool:
        return self.info.not_before <= now < self.info.not_after


class CertificateRecords:
    """Reads and writes one CA's certificates in :class:`Storage`."""

    def __init__(self, storage: Storage, directory_url: str) -> None:
        self.storage = storage
        self.directory_url = directory_url
        self.ca = ca_id(directory_url)
        self.prefix = f"acme/{self.ca}"

    def key(self, site: str, name: str) -> str:
        return f"{self.prefix}/certificates/{site}/{name}"

    def lock(self, site: str, timeout: float = 0.0) -> contextlib.AbstractContextManager[None]:
        return self.storage.lock(f"acme-{self.ca}-{site}", timeout)

    def version(self, site: str) -> object:
        """Changes whenever any process rewrites the site's metadata (cheap: one stat)."""
        return self.storage.version(self.key(site, "meta.json"))

    def meta(self, site: str) -> Metadata | None:
        raw = self.storage.load(self.key(site, "meta.json"))
        if raw is None:
            return None
        try:
            return Metadata.from_json(raw)
        except (ValueError, TypeError):
            return None

    def load(self, site: str) -> tuple[Metadata | None, StoredCertificate | None]:
        """The metadata, and the certificate when chain, key and metadata agree."""
        meta = self.meta(site)
        if meta is None or meta.serial is None:
            return meta, None
        chain_pem = self.storage.load(self.key(site, "cert.pem"))
        key_pem = self.storage.load(self.key(site, "key.pem"))
        if chain_pem is None or key_pem is None:
            return meta, None
        try:
            info = inspect(chain_pem)
        except ValueError:
            return meta, None
        if info.serial != meta.serial or not key_matches(chain_pem, key_pem):
            return meta, None  # a writer is between files, or the set is damaged
        return meta, StoredCertificate(chain_pem, key_pem, meta, info)

    def save_certificate(self, site: str, chain_pem: bytes, key_pem: bytes, meta: Metadata) -> None:
        """Key, chain, then metadata: the metadata's serial makes the new set current."""
        self.storage.store(self.key(site, "key.pem"), key_pem, private=True)
        self.storage.store(self.key(site, "cert.pem"), chain_pem)
        self.save_meta(site, meta)

    def save_meta(self, site: str, meta: Metadata) -> None:
        self.storage.store(self.key(site, "meta.json"), meta.to_json())
