"""Which certificate each handshake gets: an immutable name -> SSLContext snapshot.

Readers (the SNI callback, on the event loop, for every handshake) do one attribute read and
one or two dict lookups: no I/O, no locks. Writers (issuers, file watchers, reloads; often in
a worker thread) build the new contexts first, then publish a whole new snapshot in one
assignment under a writer-only lock. A published snapshot is never mutated, so a handshake
always sees a consistent mapping, and an open connection keeps the context it started with.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.tls.policy import (
    ALPN,
    FAILURE_ATTRIBUTE,
    SNI_ATTRIBUTE,
    policy_context,
    server_context,
)


@dataclass(frozen=True, slots=True, eq=False)
class CertEntry:
    """One installed certificate and what the ``certs`` table and logs say about it."""

    names: tuple[str, ...]
    context: ssl.SSLContext = field(repr=False)
    not_before: datetime  # aware, UTC
    not_after: datetime  # aware, UTC
    issuer: str  # "acme" | "internal" | "file" | ...
    source: str  # a file path, "internal CA", an ACME directory URL, ...
    serial: str  # hex, as ``openssl x509 -serial`` prints it


def make_entry(
    names: Sequence[str],
    chain_pem: bytes,
    key_pem: bytes,
    *,
    issuer: str = "acme",
    source: str = "acme",
) -> CertEntry:
    """Build (the slow part: parsing, loading the key) an entry without installing it.

    The chain served is ``chain_pem`` less a self-signed root at its end (:func:`served_chain`).
    Raises ``ssl.SSLError`` or ``ValueError`` for bad PEM or a key that does not match.
    """
    normalized = tuple(dict.fromkeys(normalize(n) for n in names))
    if not normalized:
        raise ValueError("a certificate needs at least one name")
    leaf = x509.load_pem_x509_certificate(chain_pem)  # the first certificate is the leaf
    return CertEntry(
        names=normalized,
        context=server_context(served_chain(chain_pem), key_pem),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        issuer=issuer,
        source=source,
        serial=f"{leaf.serial_number:X}",
    )


def served_chain(chain_pem: bytes) -> bytes:
    """``chain_pem`` (leaf first) without the self-signed root(s) at its end, if any.

    A client validates the chain up to a root it already trusts; a root sent along cannot
    make it trust anything (RFC 8446 §4.4.2 lets a server omit the trust anchor) and costs
    every full handshake its bytes, so scanners flag it (sslyze: "received certificate
    chain contains the anchor certificate"). The internal CA's leaf files and many
    ``fullchain.pem`` files end with one. The leaf itself is always kept, even if
    self-signed; a cross-signed root (issued by another CA) is an intermediate, kept too.
    ``chain_pem`` comes back unchanged when nothing is dropped.
    """
    certificates = x509.load_pem_x509_certificates(chain_pem)
    served = list(certificates)
    while len(served) > 1 and _self_signed(served[-1]):
        served.pop()
    if len(served) == len(certificates):
        return chain_pem
    return b"".join(certificate.public_bytes(Encoding.PEM) for certificate in served)


def _self_signed(certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(certificate)  # names and signature
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def normalize(name: str) -> str:
    """The lookup key for a host name: lower case, no trailing dot."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def safe_name(host: str) -> str:
    """A host as a directory name: ``*.example.com`` -> ``wildcard_.example.com``."""
    name = normalize(host).replace("*", "wildcard_").replace(":", "-")
    return re.sub(r"[^a-z0-9._-]", "_", name).lstrip(".") or "_"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Published state; the dicts are never mutated after construction."""

    entries: dict[str, CertEntry]  # normalized name -> entry (exact and "*." names)
    contexts: dict[str, ssl.SSLContext]  # the same keys -> entry.context, for the hot path
    default: CertEntry | None
    default_name: str | None  # the name whose entry is the default (follows re-issues)


_EMPTY = _Snapshot({}, {}, None, None)


class CertStore:
    """The proxy's certificates; implements ``acme_client.interfaces.CertificateSink``."""

    def __init__(self) -> None:
        self._snapshot = _EMPTY
        self._write_lock = threading.Lock()
        self._alpn = list(ALPN)
        self._listeners: list[ssl.SSLContext] = []

    # -- writers -------------------------------------------------------------------------

    def install(
        self,
        names: Sequence[str],
        chain_pem: bytes,
        key_pem: bytes,
        *,
        issuer: str = "acme",
        source: str = "acme",
    ) -> None:
        """Serve ``chain_pem``/``key_pem`` for ``names`` from the next handshake on."""
        self.install_entry(make_entry(names, chain_pem, key_pem, issuer=issuer, source=source))

    def install_entry(self, entry: CertEntry) -> CertEntry:
        """Publish a built entry; it takes over all of its names from earlier entries.

        Names of an earlier entry that the new one does not cover keep the earlier entry. The
        first entry ever installed becomes the default (see :meth:`set_default`).
        """
        with self._write_lock:
            entry.context.set_alpn_protocols(self._alpn)
            old = self._snapshot
            entries = {n: e for n, e in old.entries.items() if n not in entry.names}
            entries.update(dict.fromkeys(entry.names, entry))
            default_name = old.default_name if old.default_name in entries else entry.names[0]
            self._publish(entries, default_name)
        return entry

    def set_alpn(self, protocols: Sequence[str]) -> None:
        """The application protocols every handshake offers, in order of preference (ALPN
        is read from the context SNI switched to, so all of them must agree); new
        handshakes see the change, open connections keep what they chose."""
        with self._write_lock:
            self._alpn = list(protocols)
            contexts = [entry.context for entry in self._snapshot.entries.values()]
            for context in contexts + self._listeners:
                context.set_alpn_protocols(self._alpn)

    def set_default(self, name: str) -> None:
        """Serve ``name``'s certificate to clients that send no (or an unknown) server name."""
        key = normalize(name)
        with self._write_lock:
            entries = self._snapshot.entries
            if key not in entries:
                raise KeyError(f"no certificate installed for {name!r}")
            self._publish(dict(entries), key)

    def remove(self, names: Iterable[str]) -> None:
        """Stop serving ``names`` (unknown names are ignored)."""
        drop = {normalize(n) for n in names}
        with self._write_lock:
            old = self._snapshot
            self._publish({n: e for n, e in old.entries.items() if n not in drop}, old.default_name)

    def _publish(self, entries: dict[str, CertEntry], default_name: str | None) -> None:
        if default_name not in entries:  # the default's name went away: the oldest entry
            default_name = next(iter(entries), None)
        default = entries[default_name] if default_name is not None else None
        contexts = {n: e.context for n, e in entries.items()}
        self._snapshot = _Snapshot(entries, contexts, default, default_name)  # the one swap

    # -- readers -------------------------------------------------------------------------

    def lookup(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a handshake: exact name, then ``*.parent`` (one label), then default.

        Raises ``LookupError`` when nothing is installed.
        """
        context = self._find(self._snapshot, server_name)
        if context is None:
            raise LookupError("no certificate installed")
        return context

    @staticmethod
    def _find(snapshot: _Snapshot, server_name: str | None) -> ssl.SSLContext | None:
        if server_name:
            context = _match(snapshot.contexts, normalize(server_name))
            if context is not None:
                return context
        return snapshot.default.context if snapshot.default is not None else None

    def covers(self, server_name: str) -> bool:
        """Whether a certificate is installed for the name, exactly or by wildcard (the
        default certificate does not count)."""
        return _match(self._snapshot.contexts, normalize(server_name)) is not None

    def get(self, name: str) -> CertEntry | None:
        """The entry installed under exactly ``name`` (no wildcard or default fallback)."""
        return self._snapshot.entries.get(normalize(name))

    def entries(self) -> list[CertEntry]:
        """Each distinct installed certificate once, oldest first (``certs`` table, logs)."""
        unique = {id(e): e for e in self._snapshot.entries.values()}
        return list(unique.values())

    @property
    def default(self) -> CertEntry | None:
        return self._snapshot.default

    # -- the listener --------------------------------------------------------------------

    def listener_context(self, reject_unknown: bool | Callable[[], bool] = False) -> ssl.SSLContext:
        """The context to listen with; it never needs rebuilding when certificates change.

        It carries the TLS policy and no certificate of its own: OpenSSL (1.1.1 and later)
        calls the SNI callback for every ClientHello, with ``None`` when the client sent no
        server name, and the callback always switches the connection to the current
        snapshot's context (the default one for no or unknown names). A certificate loaded
        into the listener would only go stale. Protocol versions, ciphers and groups come
        from the listener (OpenSSL keeps them from the first context); certificate and ALPN
        from the switched one; both are built by :mod:`proxy.tls.policy`, so they agree.

        ``reject_unknown`` (``server.unknown_sni = "reject"``): a server name that matches
        no certificate, exactly or by wildcard, ends the handshake with the
        ``unrecognized_name`` alert instead of getting the default certificate. A client
        that sends no name (one connecting to an IP address) still gets the default. A
        callable is asked at each such handshake, so a reload can change the policy.
        """
        if self._snapshot.default is None:
            raise LookupError(
                "no certificate installed: the TLS listener needs at least one "
                "(configure a site with cert/key files, or an issuer)"
            )
        policy = reject_unknown if callable(reject_unknown) else _constant(reject_unknown)

        def sni_callback(
            sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
        ) -> int | None:
            snapshot = self._snapshot
            context = None
            if server_name:
                name = normalize(server_name)
                setattr(sslobj, SNI_ATTRIBUTE, name)  # for the Host check: tls.sni_of()
                context = _match(snapshot.contexts, name)
                if context is None and policy():
                    setattr(sslobj, FAILURE_ATTRIBUTE, "unknown_sni")
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            if context is None:
                if snapshot.default is None:  # everything was removed: refuse plainly
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                context = snapshot.default.context
            sslobj.context = context
            return None

        context = policy_context()
        context.set_alpn_protocols(self._alpn)
        context.sni_callback = sni_callback
        self._listeners.append(context)
        return context


def _match(contexts: dict[str, ssl.SSLContext], name: str) -> ssl.SSLContext | None:
    """The context for a normalized name: exact, then ``*.parent`` (one label); no default."""
    context = contexts.get(name)
    if context is None:
        _, dot, parent = name.partition(".")
        if dot and parent:
            context = contexts.get("*." + parent)
    return context


def _constant(value: bool) -> Callable[[], bool]:
    return lambda: value
