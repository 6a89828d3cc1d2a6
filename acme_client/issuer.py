"""One certificate order, driven step by step so that it is brisk and bounded.

new order -> for each pending authorization the first solver (:mod:`acme_client.solvers`, in
order of preference) whose challenge type the CA offers publishes its answer -> every solver
waits until the CA can see it -> the challenges are answered -> poll every 0.1-0.5 s (the
library sleeps whole seconds) until valid -> the answers are removed -> finalize with a CSR
for a fresh P-256 key -> poll the order -> download the full chain.

Synchronous (the ``acme`` library is): callers run :meth:`Issuer.obtain` in a thread. Every
wait is bounded by one deadline and by a ``cancel`` event that stops the flow between steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from acme import challenges, client, errors, messages
from cryptography.hazmat.primitives import hashes
from josepy.b64 import b64encode
from josepy.jwk import JWK

from acme_client.account import Account
from acme_client.keys import inspect, key_matches, make_csr, new_key_pem
from acme_client.network import ACMEFailure, Network, failure, validation_failure
from acme_client.solvers import Challenge, Solver

log = logging.getLogger("tlsproxy.acme")

ORDER_TIMEOUT = 120.0  # seconds for a whole order, from new-order to the downloaded chain
POLL_FIRST = 0.1
POLL_MAX = 0.5
ARI_DEFAULT_CHECK = timedelta(hours=6)  # RFC 9773's default interval between renewalInfo checks
_FAILED = frozenset({"invalid", "deactivated", "revoked", "expired"})  # authorization states


@dataclass(frozen=True, slots=True)
class Issued:
    """A new certificate: full chain (leaf first) and its private key, both PEM."""

    chain_pem: bytes
    key_pem: bytes
    order_url: str
    seconds: float  # how long the order took
    bad_nonces: int  # badNonce answers retried along the way
    directory: str = ""  # the directory URL of the CA that issued it


class Issuer:
    """Obtains certificates from one CA for one account."""

    def __init__(
        self,
        account: Account,
        solvers: Sequence[Solver],
        *,
        timeout: float = ORDER_TIMEOUT,
        poll_first: float = POLL_FIRST,
        poll_max: float = POLL_MAX,
    ) -> None:
        self.account = account
        self.solvers = tuple(solvers)  # in order of preference
        self.timeout = timeout
        self.poll_first = poll_first
        self.poll_max = poll_max

    def obtain(self, names: Sequence[str], cancel: threading.Event | None = None) -> Issued:
        """A certificate for all ``names``; raises :class:`ACMEFailure` with the CA's error."""
        try:
            return self._obtain(names, cancel)
        except ACMEFailure as exc:
            if not exc.kind.endswith(":accountDoesNotExist"):
                raise
        log.info("the CA no longer knows our ACME account: registering again")
        self.account.forget()
        return self._obtain(names, cancel)

    def _obtain(self, names: Sequence[str], cancel: threading.Event | None) -> Issued:
        started = time.monotonic()
        acme = self.account.connect()
        net = cast(Network, acme.net)
        try:
            key_pem = new_key_pem()
            order = acme.new_order(make_csr(key_pem, names))
            log.debug("order %s for %s", order.uri, ", ".join(names))
            presented: list[tuple[Solver, Challenge]] = []
            try:
                answers = self._present(acme, order, presented)
                for solver, challenge in presented:  # the CA must not look before it can see
                    solver.wait(challenge, cancel)
                flow = _Flow(self, time.monotonic() + self.timeout, cancel)
                for challb, response in answers:
                    acme.answer_challenge(challb, response)
                valid = messages.STATUS_VALID
                pending = [a for a in order.authorizations if a.body.status != valid]
                flow.wait_for_authorizations(acme, pending)
            finally:
                _cleanup(presented)
            chain_pem = flow.finalize(acme, order).encode()
        except ACMEFailure:
            raise
        except Exception as exc:
            raise failure(exc, net) from exc
        finally:
            net.session.close()
        _check_certificate(chain_pem, key_pem, names)
        return Issued(
            chain_pem,
            key_pem,
            str(order.uri),
            time.monotonic() - started,
            net.bad_nonces,
            self.account.settings.directory,
        )

    def _present(
        self,
        acme: client.ClientV2,
        order: messages.OrderResource,
        presented: list[tuple[Solver, Challenge]],
    ) -> list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]]:
        """Publish a challenge for every authorization not yet valid, each with the first
        solver (in order of preference) whose type the CA offers; what to answer."""
        answers = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA reused an earlier validation
            solver, challb = self._choose(authzr.body)
            token, key_authorization, response = answer_for(challb, cast(JWK, acme.net.key))
            challenge = Challenge(
                type=solver.challenge_type,
                name=authzr.body.identifier.value,
                wildcard=bool(authzr.body.wildcard),
                token=token,
                key_authorization=key_authorization,
            )
            solver.present(challenge)
            presented.append((solver, challenge))
            answers.append((challb, response))
        return answers

    def _choose(self, authz: messages.Authorization) -> tuple[Solver, messages.ChallengeBody]:
        offered = {challenge_type(c): c for c in authz.challenges}
        for solver in self.solvers:
            challb = offered.get(solver.challenge_type)
            if challb is not None and _has_token(challb):
                return solver, challb
        name = ("*." if authz.wildcard else "") + authz.identifier.value
        ours = ", ".join(s.challenge_type for s in self.solvers) or "none"
        raise ACMEFailure(
            "no usable challenge",
            f"{name}: the CA offered {', '.join(offered) or 'none'}; configured: {ours}",
        )

    def renewal_window(
        self, chain_pem: bytes, directory: str = ""
    ) -> tuple[datetime, datetime] | None:
        """ARI (RFC 9773): (when to renew, when to ask again), or None if the CA has no ARI."""
        settings = self.account.settings
        net = Network(self.account.key(), verify=settings.ca_bundle or True, timeout=10)
        try:
            directory = client.ClientV2.get_directory(settings.directory, net)
            try:
                directory["renewalInfo"]
            except KeyError:
                return None
            renew_at, _ = client.ClientV2(directory, net).renewal_time(chain_pem)
        except Exception as exc:
            raise failure(exc, net) from exc
        finally:
            net.session.close()
        now = datetime.now(UTC)
        next_check = net.retry_after or now + ARI_DEFAULT_CHECK
        if renew_at is None:
            return None
        if renew_at.tzinfo is None:
            renew_at = renew_at.replace(tzinfo=UTC)
        return renew_at, next_check


class _Flow:
    """The waiting parts of one order, all against the same deadline and cancel event."""

    def __init__(self, issuer: Issuer, deadline: float, cancel: threading.Event | None) -> None:
        self.issuer = issuer
        self.deadline = deadline
        self.cancel = cancel
        self.interval = issuer.poll_first

    def sleep(self, net: Network) -> None:
        """Wait one polling interval (longer if the CA asked with Retry-After), bounded."""
        delay = self.interval
        self.interval = min(self.interval * 1.5, self.issuer.poll_max)
        if net.retry_after is not None:
            delay = max(delay, (net.retry_after - datetime.now(UTC)).total_seconds())
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ACMEFailure("timeout", f"the CA did not finish within {self.issuer.timeout:g} s")
        delay = min(delay, remaining)
        if self.cancel is not None:
            if self.cancel.wait(delay):
                raise ACMEFailure("cancelled", "the order was stopped (shutting down)")
        else:
            time.sleep(delay)

    def wait_for_authorizations(
        self, acme: client.ClientV2, pending: list[messages.AuthorizationResource]
    ) -> None:
        net = cast(Network, acme.net)
        while pending:
            still, failed = [], []
            for authzr in pending:
                updated, _ = acme.poll(authzr)
                status = updated.body.status
                if status.name in _FAILED:
                    failed.append(updated)
                elif status != messages.STATUS_VALID:
                    still.append(updated)
            if failed:
                raise validation_failure(failed)
            pending = still
            if pending:
                self.sleep(net)

    def finalize(self, acme: client.ClientV2, order: messages.OrderResource) -> str:
        """Send the CSR, poll the order until valid, return the full chain PEM."""
        net = cast(Network, acme.net)
        new_nonce = acme.directory["newNonce"]
        self.interval = self.issuer.poll_first
        try:
            order = acme.begin_finalization(order)
        except messages.Error as exc:
            if exc.code != "orderNotReady":
                raise
        finalized_again = False
        while True:
            body = order.body
            if body.status == messages.STATUS_VALID and body.certificate:
                return str(net.post(body.certificate, None, new_nonce_url=new_nonce).text)
            if body.status == messages.STATUS_INVALID:
                if body.error is not None:
                    raise errors.IssuanceError(body.error)
                raise ACMEFailure("order invalid", "the CA gave no reason")
            if body.status == messages.STATUS_READY and not finalized_again:
                order, finalized_again = acme.begin_finalization(order), True
                continue
            self.sleep(net)
            response = net.post(order.uri, None, new_nonce_url=new_nonce)
            order = order.update(body=messages.Order.from_json(response.json()))


def challenge_type(challb: messages.ChallengeBody) -> str:
    """``http-01``, ``dns-01``, ...: also for types the library does not know (its
    ``UnrecognizedChallenge`` keeps the JSON, type included)."""
    chall = challb.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type", "unknown"))
    return str(chall.typ)


class _KeyAuthorizationResponse(challenges.KeyAuthorizationChallengeResponse):
    """The answer to a challenge type the library no longer knows (TLS-ALPN-01): an empty
    JSON object, as for every key-authorization challenge (RFC 8555 7.5.1)."""

    typ = "tls-alpn-01"


def _has_token(challb: messages.ChallengeBody) -> bool:
    chall = challb.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return isinstance(chall.jobj.get("token"), str)
    return isinstance(chall, challenges.KeyAuthorizationChallenge)


def answer_for(
    challb: messages.ChallengeBody, key: JWK
) -> tuple[str, str, challenges.ChallengeResponse]:
    """(token, key authorization, response) for a challenge: the library's own for the types
    it knows, built from the JSON for the others (RFC 8555 8.1: token "." thumbprint)."""
    chall = challb.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        token = str(chall.jobj["token"])
        thumbprint = b64encode(key.thumbprint(hash_function=hashes.SHA256)).decode()
        key_authorization = f"{token}.{thumbprint}"
        return (
            token,
            key_authorization,
            _KeyAuthorizationResponse(key_authorization=key_authorization),
        )
    known = cast(challenges.KeyAuthorizationChallenge, chall)
    return known.encode("token"), known.key_authorization(key), known.response(key)


def _cleanup(presented: list[tuple[Solver, Challenge]]) -> None:
    """Remove every published answer; one that fails is logged, the others still go."""
    for solver, challenge in presented:
        try:
            solver.cleanup(challenge)
        except Exception as exc:
            log.warning("%s for %s: cleaning up failed: %s", challenge.type, challenge.name, exc)


def _check_certificate(chain_pem: bytes, key_pem: bytes, names: Sequence[str]) -> None:
    """Never store what the CA sent unless it is for our key and all our names."""
    try:
        info = inspect(chain_pem)
    except ValueError as exc:
        raise ACMEFailure("bad certificate", f"the CA sent an unusable certificate: {exc}") from exc
    missing = {n.lower() for n in names} - info.names
    if missing or not key_matches(chain_pem, key_pem):
        what = f"lacks {', '.join(sorted(missing))}" if missing else "is not for our key"
        raise ACMEFailure("bad certificate", f"the certificate from the CA {what}")
