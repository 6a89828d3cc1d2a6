"""Port 80: ACME HTTP-01 answers from the challenge store, a 308 to HTTPS for the rest."""

from __future__ import annotations

from collections.abc import Callable

import h11

from acme_client.interfaces import ChallengeStore, is_valid_token
from proxy.http.router import Router
from proxy.plain.server import Answer, text

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


class HTTPResponder:
    """Answers port-80 requests; reads the current router through ``router()`` per request."""

    def __init__(
        self, challenges: ChallengeStore, router: Callable[[], Router], https_port: int
    ) -> None:
        self._challenges = challenges
        self._router = router
        self._port_suffix = b"" if https_port == 443 else b":%d" % https_port

    def __call__(self, request: h11.Request) -> Answer:
        target = request.target
        if target.startswith(CHALLENGE_PREFIX):
            return self._challenge(target[len(CHALLENGE_PREFIX) :])
        host = next((v for n, v in request.headers if n == b"host"), b"")
        if self._router().match(host) is None:
            return text(404, "no site is configured for this host")
        name = host.rsplit(b":", 1)[0] if b":" in host else host
        if not target.startswith(b"/"):  # absolute-form or '*': redirect to the root
            target = b"/"
        location = b"https://" + name.lower() + self._port_suffix + target
        return Answer(308, b"", ((b"location", location),))

    def _challenge(self, token_bytes: bytes) -> Answer:
        try:
            token = token_bytes.decode("ascii")
        except UnicodeDecodeError:
            return text(404)
        if not is_valid_token(token):
            return text(404)
        key_authorization = self._challenges.get(token)
        if key_authorization is None:
            return text(404)
        return Answer(200, key_authorization.encode(), content_type=b"application/octet-stream")
