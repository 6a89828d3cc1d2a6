"""The small interfaces where the proxy and certificate issuers meet.

The proxy implements :class:`CertificateSink` (its certificate store) and reads a
:class:`ChallengeStore` from its port-80 responder; issuers write to both. Neither side
imports the other's internals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

# RFC 8555 section 8.3: the token is base64url without padding; 43 chars for 32 bytes, we
# accept any sane length so that other CAs' tokens work too.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,256}")


def is_valid_token(token: str) -> bool:
    """True for a syntactically valid ACME HTTP-01 token (no path tricks possible)."""
    return _TOKEN_RE.fullmatch(token) is not None


@runtime_checkable
class CertificateSink(Protocol):
    """Where newly obtained certificates go; the proxy's certificate store implements it."""

    def install(self, names: Sequence[str], chain_pem: bytes, key_pem: bytes) -> None:
        """Serve ``chain_pem``/``key_pem`` for ``names`` on the next handshake."""
        ...


@runtime_checkable
class ChallengeStore(Protocol):
    """HTTP-01 key authorizations by token: the issuer writes, the port-80 responder reads."""

    def put(self, token: str, key_authorization: str) -> None: ...

    def get(self, token: str) -> str | None: ...

    def delete(self, token: str) -> None: ...


class MemoryChallengeStore:
    """A process-local :class:`ChallengeStore` (enough for one process; replicas share storage)."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    def put(self, token: str, key_authorization: str) -> None:
        if not is_valid_token(token):
            raise ValueError(f"invalid ACME token {token!r}")
        self._tokens[token] = key_authorization

    def get(self, token: str) -> str | None:
        return self._tokens.get(token)

    def delete(self, token: str) -> None:
        self._tokens.pop(token, None)
