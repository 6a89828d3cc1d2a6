"""One ECDSA P-256 CA and leaf shared by every contender, so no proxy gets a cheaper key."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAMES = ("bench.test", "localhost")  # wrk sends the URL host as SNI: localhost resolves here


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Paths of the generated PEM files; ``bundle`` is key + chain for HAProxy/mitmproxy."""

    ca: Path
    chain: Path
    key: Path
    bundle: Path


def make_certificates(directory: Path) -> CertFiles:
    """Write a CA and a 30-day leaf for ``NAMES`` and 127.0.0.1 into ``directory``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsproxy benchmark CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in NAMES]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])])
    leaf = (
        _builder(leaf_name, ca_name, leaf_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain_pem = leaf.public_bytes(serialization.Encoding.PEM)
    files = CertFiles(
        ca=directory / "ca.pem",
        chain=directory / "cert.pem",
        key=directory / "key.pem",
        bundle=directory / "bundle.pem",
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.chain.write_bytes(chain_pem)
    files.key.write_bytes(key_pem)
    files.key.chmod(0o600)
    files.bundle.write_bytes(chain_pem + key_pem)
    files.bundle.chmod(0o600)
    return files


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    """The fields every certificate here shares (validity starts an hour ago: clock skew)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    """Key usage: a CA signs certificates, a leaf signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
