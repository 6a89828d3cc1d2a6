"""One ECDSA P-256 CA and leaf shared by every contender, so no proxy gets a cheaper key.

They come from tlsproxy's own internal CA code: the same kind of certificate users run with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from proxy.certs.internal_ca import InternalCA

NAMES = ("bench.test", "localhost")  # wrk sends the URL host as SNI: localhost resolves here
_END = b"-----END CERTIFICATE-----\n"


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Paths of the generated PEM files; ``bundle`` is key + chain for HAProxy/mitmproxy."""

    ca: Path
    chain: Path
    key: Path
    bundle: Path


def make_certificates(directory: Path) -> CertFiles:
    """Write a CA and a 30-day leaf for ``NAMES`` and 127.0.0.1 into ``directory``."""
    ca = InternalCA.load_or_create(directory / "ca")
    chain_pem, key_pem = ca.issue([*NAMES, "127.0.0.1"], lifetime=timedelta(days=30))
    leaf_pem = chain_pem[: chain_pem.index(_END) + len(_END)]  # the leaf alone, as before
    files = CertFiles(
        ca=ca.root_path,
        chain=directory / "cert.pem",
        key=directory / "key.pem",
        bundle=directory / "bundle.pem",
    )
    files.chain.write_bytes(leaf_pem)
    files.key.write_bytes(key_pem)
    files.key.chmod(0o600)
    files.bundle.write_bytes(leaf_pem + key_pem)
    files.bundle.chmod(0o600)
    return files
