"""The TLS listener's answer to a TLS-ALPN-01 validation: the challenge certificate's context.

The key authorization comes from storage (:class:`acme_client.tlsalpn.ALPNChallenges`), so
whichever process or replica the CA reaches can answer, whoever placed the order. Contexts
are built once per pending challenge and kept while it is pending; they offer only the
``acme-tls/1`` protocol, as RFC 8737 requires.
"""

from __future__ import annotations

import logging
import ssl

from acme_client.tlsalpn import ALPN_PROTOCOL, ALPNChallenges, challenge_certificate
from proxy.tls.policy import server_context

log = logging.getLogger("tlsproxy.certs")

MAX_CACHED = 64  # contexts kept; more pending challenges at once just rebuild


class ALPNChallengeContexts:
    """``context_for(name)``: the context for a name with a pending challenge, else None."""

    def __init__(self, challenges: ALPNChallenges) -> None:
        self.challenges = challenges
        self._built: dict[tuple[str, str], ssl.SSLContext] = {}

    def context_for(self, name: str) -> ssl.SSLContext | None:
        try:
            key_authorization = self.challenges.get(name)
        except Exception as exc:  # storage unreachable: the CA gets an ordinary handshake
            log.warning("TLS-ALPN-01 for %s: reading storage failed: %s", name, exc)
            return None
        if key_authorization is None:
            return None
        context = self._built.get((name, key_authorization))
        if context is None:
            if len(self._built) >= MAX_CACHED:
                self._built.clear()
            context = server_context(*challenge_certificate(name, key_authorization))
            context.set_alpn_protocols([ALPN_PROTOCOL])
            self._built[name, key_authorization] = context
        return context
