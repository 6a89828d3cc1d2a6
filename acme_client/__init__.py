"""ACME (RFC 8555) certificate issuance for tlsproxy.

This package never imports :mod:`proxy`; the two meet through the small protocols in
:mod:`acme_client.interfaces`.
"""

from acme_client.interfaces import CertificateSink, ChallengeStore, MemoryChallengeStore

__all__ = ["CertificateSink", "ChallengeStore", "MemoryChallengeStore"]
