"""One certificate order over HTTP-01, driven step by step so that it is brisk and bounded.

new order -> for each pending authorization: the HTTP-01 key authorization goes into the
:class:`ChallengeStore` (the port-80 listener answers it), the challenge is answered ->
poll every 0.1-0.5 s (the library sleeps whole seconds) until valid -> finalize with a CSR
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

from acme_client.account import Account
from acme_client.interfaces import ChallengeStore
from acme_client.keys import inspect, key_matches, make_csr, new_key_pem
from acme_client.network import ACMEFailure, Network, failure, validation_failure

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


class Issuer:
    """Obtains certificates from one CA for one account."""

    def __init__(
        self,
        account: Account,
        challenge_store: ChallengeStore,
        *,
        timeout: float = ORDER_TIMEOUT,
        poll_first: float = POLL_FIRST,
        poll_max: float = POLL_MAX,
    ) -> None:
        self.account = account
        self.challenges = challenge_store
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
        flow = _Flow(self, started + self.timeout, cancel)
        acme = self.account.connect()
        net = cast(Network, acme.net)
        try:
            key_pem = new_key_pem()
            order = acme.new_order(make_csr(key_pem, names))
            log.debug("order %s for %s", order.uri, ", ".join(names))
            tokens: list[str] = []
            try:
                pending = self._answer(acme, order, tokens)
                flow.wait_for_authorizations(acme, pending)
            finally:
                for token in tokens:
                    self.challenges.delete(token)
            chain_pem = flow.finalize(acme, order).encode()
        except ACMEFailure:
            raise
        except Exception as exc:
            raise failure(exc, net) from exc
        finally:
            net.session.close()
        _check_certificate(chain_pem, key_pem, names)
        return Issued(
            chain_pem, key_pem, str(order.uri), time.monotonic() - started, net.bad_nonces
        )

    def _answer(
        self, acme: client.ClientV2, order: messages.OrderResource, tokens: list[str]
    ) -> list[messages.AuthorizationResource]:
        """Publish and answer the HTTP-01 challenge of every authorization not yet valid."""
        pending = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA reused an earlier validation
            name = authzr.body.identifier.value
            challb = next(
                (c for c in authzr.body.challenges if isinstance(c.chall, challenges.HTTP01)), None
            )
            if challb is None:
                offered = ", ".join(str(c.chall.typ) for c in authzr.body.challenges) or "none"
                raise ACMEFailure("no http-01 challenge", f"{name}: the CA offered {offered}")
            response, key_authorization = challb.response_and_validation(acme.net.key)
            token = challb.chall.encode("token")
            self.challenges.put(token, key_authorization)
            tokens.append(token)
            acme.answer_challenge(challb, response)
            pending.append(authzr)
        return pending

    def renewal_window(self, chain_pem: bytes) -> tuple[datetime, datetime] | None:
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
