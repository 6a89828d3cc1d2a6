"""Challenge solvers: how a CA's challenge for one name is made visible, awaited and removed.

Every challenge type (HTTP-01, DNS-01, TLS-ALPN-01) is one :class:`Solver` with three
steps, the same for all (certmagic's ``acmez.Solver`` and lego's providers are the model):

* ``present``: publish what the CA will look for (an HTTP-01 token in the challenge store, a
  TXT record in DNS, ...);
* ``wait``: return once the CA can see it (DNS: every authoritative nameserver serves the
  record); only then is the challenge answered, so the CA never looks too early;
* ``cleanup``: remove it again, after success and after failure alike.

The issuer (:mod:`acme_client.issuer`) picks, per authorization, the first solver in its
list of preference whose type the CA offers. Solvers never talk to the CA.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from acme_client.interfaces import ChallengeStore


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge to solve, as a solver needs it."""

    type: str  # "http-01" | "dns-01" | "tls-alpn-01"
    name: str  # the identifier being validated; for a wildcard the name below "*."
    wildcard: bool  # the order asked for "*.<name>" (only DNS-01 can prove that)
    token: str  # base64url, as the CA sent it
    key_authorization: str  # token "." base64url(SHA-256 thumbprint of the account key)


class Solver(Protocol):
    """Publishes the answer to one type of challenge."""

    @property
    def challenge_type(self) -> str:
        """The ACME challenge type this solver answers, e.g. ``"http-01"``."""
        ...

    def present(self, challenge: Challenge) -> None:
        """Publish the answer; raises :class:`SolverError` when it cannot."""
        ...

    def wait(self, challenge: Challenge, cancel: threading.Event | None = None) -> None:
        """Return once the CA can see the answer (bounded); :class:`SolverError` if it
        did not become visible in time."""
        ...

    def cleanup(self, challenge: Challenge) -> None:
        """Remove the answer (called after success and after failure)."""
        ...


class SolverError(Exception):
    """A challenge could not be published or did not become visible; the message says why
    in words for the log (never a secret)."""


class HTTP01Solver:
    """HTTP-01: the key authorization in a :class:`ChallengeStore`, which the port-80
    listener of every process sharing it answers from. Visible as soon as it is stored."""

    challenge_type = "http-01"

    def __init__(self, store: ChallengeStore) -> None:
        self.store = store

    def present(self, challenge: Challenge) -> None:
        self.store.put(challenge.token, challenge.key_authorization)

    def wait(self, challenge: Challenge, cancel: threading.Event | None = None) -> None:
        return None  # the next request from the CA reads storage

    def cleanup(self, challenge: Challenge) -> None:
        self.store.delete(challenge.token)
