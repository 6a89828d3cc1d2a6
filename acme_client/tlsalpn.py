"""TLS-ALPN-01 (RFC 8737): the CA validates on port 443 itself, no port 80 needed.

The CA opens a TLS connection to the name with ALPN ``acme-tls/1`` and expects a
self-signed certificate for exactly that name carrying the critical ``acmeIdentifier``
extension: the SHA-256 of the key authorization. :class:`TLSALPN01Solver` puts the key
authorization into storage by name (so any process or replica listening on 443 can answer);
:func:`challenge_certificate` builds the certificate the TLS listener then serves.

The ``acme`` library dropped TLS-ALPN-01 in 5.0; the issuer answers it from the challenge's
JSON (see :func:`acme_client.issuer.answer_for`).
"""

from __future__ import annotations

import hashlib
import re
import threading
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from acme_client.solvers import Challenge
from acme_client.storage import Storage

ALPN_PROTOCOL = "acme-tls/1"
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # id-pe-acmeIdentifier
PREFIX = "acme/challenges/tls-alpn-01"
LIFETIME = timedelta(days=1)  # the certificate is only shown to the validating CA
_NAME = re.compile(r"[a-z0-9_-][a-z0-9_.-]{0,252}")


def challenge_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): self-signed for ``name``, with the critical
    ``acmeIdentifier`` holding SHA-256(key authorization) as a DER OCTET STRING."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class ALPNChallenges:
    """Pending TLS-ALPN-01 key authorizations by name, in the storage every process shares."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def put(self, name: str, key_authorization: str) -> None:
        self.storage.store(_key(name), key_authorization.encode("ascii"))

    def get(self, name: str) -> str | None:
        """The pending key authorization for ``name`` (None for names that cannot be ours)."""
        if not _NAME.fullmatch(name):
            return None
        data = self.storage.load(f"{PREFIX}/{name}")
        return None if data is None else data.decode("ascii", "replace")

    def delete(self, name: str) -> None:
        self.storage.delete(_key(name))


def _key(name: str) -> str:
    name = name.lower()
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid name for a TLS-ALPN-01 challenge {name!r}")
    return f"{PREFIX}/{name}"


class TLSALPN01Solver:
    """Publishes the key authorization by name; the TLS listener answers from it."""

    challenge_type = "tls-alpn-01"

    def __init__(self, challenges: ALPNChallenges) -> None:
        self.challenges = challenges

    def present(self, challenge: Challenge) -> None:
        self.challenges.put(challenge.name, challenge.key_authorization)

    def wait(self, challenge: Challenge, cancel: threading.Event | None = None) -> None:
        return None  # the next handshake reads storage

    def cleanup(self, challenge: Challenge) -> None:
        self.challenges.delete(challenge.name)
