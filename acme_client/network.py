"""The HTTP side of talking to a CA: persistent badNonce retries, Retry-After, clear errors.

``acme.client.ClientNetwork`` retries a ``badNonce`` exactly once (production CAs and Pebble
reject good nonces now and then, so one retry is not enough) and does not attach the
response, hence ``Retry-After``, to the problem documents it raises. :class:`Network` fixes
both; :func:`failure` turns whatever the library raised into one :class:`ACMEFailure` that
names the CA's error type and detail for logs, metadata and ``tlsproxy renew``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, cast

import requests
from acme import client, errors, messages
from josepy.jwa import ES256
from josepy.jwk import JWK

from acme_client.solvers import SolverError

log = logging.getLogger("tlsproxy.acme")

USER_AGENT = "tlsproxy-acme"
BAD_NONCE_TRIES = 10  # attempts of one request while the CA answers badNonce


class ACMEFailure(Exception):
    """An order or registration failed; ``kind`` is the CA's error type when it sent one."""

    def __init__(self, kind: str, detail: str, retry_after: datetime | None = None) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after  # aware UTC; the CA asked us to wait until then


@dataclass(frozen=True, slots=True)
class Problem:
    """A problem document's essentials, for one identifier."""

    kind: str
    detail: str


class Network(client.ClientNetwork):
    """A ``ClientNetwork`` that retries ``badNonce`` several times and remembers Retry-After."""

    def __init__(self, key: JWK, *, verify: str | bool, timeout: float) -> None:
        # verify_ssl is annotated bool, but requests (and the library) accept a CA bundle path
        super().__init__(
            key,
            alg=ES256,
            verify_ssl=cast(bool, verify),
            user_agent=USER_AGENT,
            timeout=cast(int, timeout),
        )
        self.retry_after: datetime | None = None  # from the most recent response
        self.bad_nonces = 0
        self.session.hooks["response"].append(self._remember_retry_after)

    def _remember_retry_after(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.retry_after = parse_retry_after(response.headers.get("Retry-After"))

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(1, BAD_NONCE_TRIES + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == BAD_NONCE_TRIES:
                    raise
                self.bad_nonces += 1
                log.debug("badNonce from the CA, retrying (attempt %d)", attempt + 1)
        raise AssertionError("unreachable")


def parse_retry_after(value: str | None, now: datetime | None = None) -> datetime | None:
    """``Retry-After`` as an aware UTC time: delta-seconds or an HTTP-date (RFC 9110).

    (``ClientV2.retry_after`` compares a naive UTC date with naive local time.)
    """
    if not value:
        return None
    now = datetime.now(UTC) if now is None else now
    value = value.strip()
    if value.isdigit():
        return now + timedelta(seconds=int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def problem(error: messages.Error) -> Problem:
    """Type and detail of a problem document, with its subproblems' details appended."""
    detail = error.detail or error.title or ""
    for sub in error.subproblems or ():
        where = f"{sub.identifier.value}: " if sub.identifier is not None else ""
        detail += f"; {where}{sub.typ}: {sub.detail or ''}"
    return Problem(str(error.typ), detail)


def failure(exc: BaseException, net: Network | None = None) -> ACMEFailure:
    """One :class:`ACMEFailure` for anything the ``acme`` library or ``requests`` raised."""
    if isinstance(exc, ACMEFailure):
        return exc
    retry_after = net.retry_after if net is not None else None
    if isinstance(exc, SolverError):
        return ACMEFailure("challenge not published", str(exc))
    if isinstance(exc, messages.Error):
        found = problem(exc)
        return ACMEFailure(found.kind, found.detail, retry_after)
    if isinstance(exc, errors.IssuanceError):
        found = problem(exc.error)
        return ACMEFailure(found.kind, found.detail, retry_after)
    if isinstance(exc, errors.ValidationError):
        return validation_failure(exc.failed_authzrs)
    if isinstance(exc, requests.exceptions.SSLError):
        return ACMEFailure("CA unreachable", f"TLS to the CA failed: {_short(exc)}")
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return ACMEFailure("CA unreachable", _short(exc))
    if isinstance(exc, requests.exceptions.RequestException):
        return ACMEFailure("CA request failed", _short(exc))
    if isinstance(exc, errors.Error):
        return ACMEFailure(type(exc).__name__, str(exc) or repr(exc), retry_after)
    return ACMEFailure(type(exc).__name__, str(exc))


def validation_failure(authzrs: list[messages.AuthorizationResource]) -> ACMEFailure:
    """The challenge errors of failed authorizations, per name."""
    kinds: list[str] = []
    details: list[str] = []
    for authzr in authzrs:
        name = authzr.body.identifier.value
        errors_found = [c.error for c in authzr.body.challenges if c.error is not None]
        if not errors_found:
            details.append(f"{name}: authorization is {authzr.body.status}")
        for error in errors_found:
            found = problem(error)
            kinds.append(found.kind)
            details.append(f"{name}: {found.detail}")
    kind = kinds[0] if kinds else "validation failed"
    return ACMEFailure(kind, "; ".join(details))


def _short(exc: BaseException) -> str:
    """requests wraps urllib3 wraps the socket error: keep the URL and the innermost reason."""
    url = getattr(getattr(exc, "request", None), "url", None)
    inner = exc.args[0] if exc.args else exc
    text = str(getattr(inner, "reason", None) or inner)
    if text.startswith("<") and ">: " in text:  # "<urllib3.connection... object at 0x..>: ..."
        text = text.split(">: ", 1)[1]
    if text.startswith(("HTTPSConnection(", "HTTPConnection(")) and "): " in text:
        text = text.split("): ", 1)[1]  # the URL says it already
    return f"{url}: {text}" if url else text
