"""A local certificate authority for development and private networks (Caddy's ``tls internal``).

One ECDSA P-256 root is created on first use and kept in ``<tls.storage>/ca/`` (``root.pem``
is what users add to a trust store; ``root.key`` never leaves that 0700 directory). Leaves are
short-lived (7 days by default) and re-issued long before they expire, so no revocation is
needed and scanners' "lifespan under 366 days" rule holds.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs.pemfiles import CERT_MODE, KEY_MODE, locked, make_private_dir, write_atomic

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
ROOT_LIFETIME = timedelta(days=3650)
DEFAULT_LEAF_LIFETIME = timedelta(days=7)
MAX_LEAF_LIFETIME = timedelta(days=180)  # well under the 366 days browsers and sslyze accept
BACKDATE = timedelta(minutes=1)  # tolerate clients whose clock is slightly behind


class InternalCAError(Exception):
    """The stored CA is unusable (one of its two files missing, or a key that does not match)."""


@dataclass(frozen=True, slots=True)
class InternalCA:
    """A loaded root: its certificate, key and where they live."""

    directory: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load_or_create(cls, directory: Path | str) -> InternalCA:
        """Load the root from ``directory`` (normally ``<tls.storage>/ca``), creating it once.

        A lock file serialises workers that start together, so they all end up with the same
        root. A half-present CA is an error rather than silently replaced: users may already
        trust the old root.
        """
        directory = make_private_dir(directory)
        with locked(directory / ".lock"):
            cert_path, key_path = directory / ROOT_CERT, directory / ROOT_KEY
            if not cert_path.exists() and not key_path.exists():
                key, cert = _new_root()
                write_atomic(key_path, _key_pem(key), KEY_MODE)
                write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
            return cls._load(directory)

    @classmethod
    def _load(cls, directory: Path) -> InternalCA:
        try:
            cert = x509.load_pem_x509_certificate((directory / ROOT_CERT).read_bytes())
            key = serialization.load_pem_private_key(
                (directory / ROOT_KEY).read_bytes(), password=None
            )
        except (OSError, ValueError) as exc:
            raise InternalCAError(f"internal CA in {directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != (
            cert.public_key()
        ):
            raise InternalCAError(f"internal CA in {directory}: {ROOT_KEY} does not match")
        return cls(directory, cert, key)

    @property
    def root_path(self) -> Path:
        """The root certificate file users trust (``curl --cacert``)."""
        return self.directory / ROOT_CERT

    @property
    def root_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, names: Sequence[str], lifetime: timedelta = DEFAULT_LEAF_LIFETIME
    ) -> tuple[bytes, bytes]:
        """A fresh leaf for ``names``: ``(leaf + root chain PEM, leaf key PEM)``.

        ``names`` are DNS names (``*.example.com`` allowed) or IP literals. The chain is
        stored whole, like a ``fullchain.pem``; the root is not sent to clients
        (:func:`proxy.certs.store.served_chain`).
        """
        if not names:
            raise ValueError("a certificate needs at least one name")
        if not timedelta(0) < lifetime <= MAX_LEAF_LIFETIME:
            raise ValueError(f"leaf lifetime must be positive and at most {MAX_LEAF_LIFETIME}")
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsproxy internal")]
        if len(names[0]) <= 64:  # the X.520 upper bound for a common name
            subject.append(x509.NameAttribute(NameOID.COMMON_NAME, names[0]))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + lifetime, self.certificate.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.root_pem
        return chain, _key_pem(key)

    def issued(self, cert: x509.Certificate) -> bool:
        """True if this root signed ``cert`` (a stored leaf from an older root is not reused)."""
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def _new_root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsproxy"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"tlsproxy Local Root CA - {secrets.token_hex(4)}"
            ),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name.lower().rstrip(".")))
    return out


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
