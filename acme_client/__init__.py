"""ACME (RFC 8555) certificate issuance for tlsproxy, over HTTP-01.

This package never imports :mod:`proxy`; the two meet through the small protocols in
:mod:`acme_client.interfaces`. Modules, one job each: ``storage`` (shared key/value state
with locks), ``challenges`` (HTTP-01 tokens in storage), ``keys`` (keys, CSRs, certificate
facts), ``records`` (the storage layout and metadata), ``network`` (badNonce retries,
Retry-After, error reports), ``account``, ``issuer`` (one order), ``schedule`` (when to renew
or retry: the only place that knows), ``renewer`` (orders under the storage lock, and what a
running process tracks per certificate; the proxy's maintenance loop drives it).
"""

from acme_client.interfaces import CertificateSink, ChallengeStore, MemoryChallengeStore

__all__ = ["CertificateSink", "ChallengeStore", "MemoryChallengeStore"]
