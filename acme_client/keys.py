"""Keys, CSRs and certificate facts (cryptography only; no network, no storage).

Every certificate gets a fresh ECDSA P-256 key: a renewal never reuses the old key, so a
leaked key dies with its certificate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from acme import crypto_util
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWKEC


def new_key_pem() -> bytes:
    """A fresh ECDSA P-256 private key as unencrypted PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_account_key(pem: bytes) -> JWKEC:
    """The account key as a JWK. ``jose.JWK.load`` would quietly return a symmetric key for
    bytes it cannot parse; this raises ``ValueError`` instead."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the ACME account key is not an EC key")
    return JWKEC(key=key)


def make_csr(key_pem: bytes, names: Sequence[str]) -> bytes:
    """A CSR (PEM) carrying ``names`` as SANs, signed with ``key_pem``."""
    return crypto_util.make_csr(key_pem, list(names))


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What the scheduler and the ``certs`` table need to know about a leaf."""

    names: frozenset[str]
    not_before: datetime  # aware, UTC
    not_after: datetime  # aware, UTC
    serial: str  # upper-case hex, as ``openssl x509 -serial`` prints it
    issuer: str  # the issuing CA's common name (or its whole DN)


def inspect(chain_pem: bytes) -> CertificateInfo:
    """Facts about the first (leaf) certificate of a PEM chain; ``ValueError`` if unusable."""
    leaf = x509.load_pem_x509_certificate(chain_pem)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no subjectAltName") from None
    names = frozenset(name.lower() for name in san.get_values_for_type(x509.DNSName))
    common = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    issuer = str(common[0].value) if common else leaf.issuer.rfc4514_string()
    return CertificateInfo(
        names=names,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=f"{leaf.serial_number:X}",
        issuer=issuer,
    )


def key_matches(chain_pem: bytes, key_pem: bytes) -> bool:
    """True when ``key_pem`` is the private key of the chain's leaf."""
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    return key.public_key() == leaf.public_key()
