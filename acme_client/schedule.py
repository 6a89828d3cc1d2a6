"""When to renew and when to retry: pure functions of a certificate's own lifetime.

A fixed "30 days before expiry" breaks with 45-day or 6-day certificates; a third of the
remaining lifetime (Let's Encrypt's advice, certmagic's default) scales from 90-second test
certificates to 90-day ones. When the CA offers ACME Renewal Information (RFC 9773), its
suggested window wins. Failed attempts back off exponentially with jitter, within bounds
scaled to the lifetime, and the next attempt is always before expiry.

This module is the only place that knows these rules: ACME certificates, internal leaves,
temporary certificates and the status page all ask it.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

RENEW_FRACTION = 1 / 3  # renew when this fraction of the lifetime remains
RETRY_MIN = timedelta(minutes=1)
RETRY_MAX = timedelta(hours=1)
RETRY_FLOOR = timedelta(seconds=1)  # never retry faster than this, however short-lived
JITTER = 0.2  # +-20 %
BROKEN_RETRY_MIN = timedelta(seconds=15)  # maintenance that failed outside the CA (storage down)
BROKEN_RETRY_MAX = timedelta(minutes=15)
BUSY_RETRY = timedelta(seconds=2)  # another process holds the order lock: adopt its result then
ARI_RETRY = timedelta(hours=1)  # the CA's renewalInfo could not be had: ask again after this


def renewal_due(
    not_before: datetime, not_after: datetime, ari_renew_at: datetime | None = None
) -> datetime:
    """When to renew: the ARI time if the CA gave one, else when a third of the lifetime is left."""
    if ari_renew_at is not None:
        return min(ari_renew_at, not_after)
    return not_after - (not_after - not_before) * RENEW_FRACTION


def retry_bounds(lifetime: timedelta | None) -> tuple[timedelta, timedelta]:
    """The first and the longest retry delay: 1 min ... 1 h, scaled down for short lifetimes
    (a 90 s certificate retries after ~1.5 s, at most every ~15 s)."""
    if lifetime is None:
        return RETRY_MIN, RETRY_MAX
    low = max(min(RETRY_MIN, lifetime / 60), RETRY_FLOOR)
    high = max(min(RETRY_MAX, lifetime / 6), low)
    return low, high


def retry_delay(
    failures: int, lifetime: timedelta | None, rng: random.Random | None = None
) -> timedelta:
    """The delay after ``failures`` consecutive failures: doubling from the lower bound, capped,
    with jitter so that many processes or sites do not retry in lock step."""
    low, high = retry_bounds(lifetime)
    base = min(low * 2 ** max(failures - 1, 0), high)
    factor: float = 1 + (rng or random).uniform(-JITTER, JITTER)
    delay: timedelta = base * factor
    return max(delay, RETRY_FLOOR)


def next_attempt(
    now: datetime,
    failures: int,
    *,
    not_after: datetime | None = None,
    lifetime: timedelta | None = None,
    retry_after: datetime | None = None,
    rng: random.Random | None = None,
) -> datetime:
    """When to try again after a failure.

    The CA's ``Retry-After`` (rate limits) is honoured, but while the current certificate is
    still valid an attempt always happens before it expires: a retry that would land after
    expiry is moved to half-way between now and expiry.
    """
    at = now + retry_delay(failures, lifetime, rng)
    if retry_after is not None:
        at = max(at, retry_after)
    if not_after is not None and now < not_after <= at:
        at = now + max((not_after - now) / 2, RETRY_FLOOR)
    return at


def broken_retry_delay(failures: int) -> timedelta:
    """The delay after maintenance failed ``failures`` times in a row for a reason that is not
    the CA's (storage unreachable): 15 s doubling to 15 min. No jitter, no lifetime: nothing
    was ordered, so no CA sees these retries."""
    delay: timedelta = BROKEN_RETRY_MIN * 2 ** max(failures - 1, 0)
    return min(BROKEN_RETRY_MAX, delay)
