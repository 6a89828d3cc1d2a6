"""What the admin status page and ``GET /api/status`` show, as one JSON-able dict.

Everything is read from sources the proxy already keeps: the configuration, the upstream
pool's passive health, the metric counters, the certificate store, and the same storage
rows ``tlsproxy certs`` prints (:func:`proxy.certs.sources.describe_certificates`), so the page
and ``certs`` cannot disagree. No private key, account key, ACME token or admin token is
ever read into it.

Schema (``GET /api/status``; times are ISO 8601 UTC strings or null)::

    {"generated_at": str, "pid": int, "workers": int | "auto",
     "scope": "the whole instance" | "one worker process: ...",
     "sites": [{"name": str, "hosts": [str], "state": "up" | "degraded" | "down",
                "source": "file" | "docker: <container>, ...",     # where the site came from
                "upstreams": [{"url": str, "state": "up" | "failing",
                               "failing_since": str | null, "last_error": str | null}],
                "requests": {"total": int, "by_class": {"2xx": int, ...}, "errors_5xx": int,
                             "error_share": float | null,     # 5xx / total since start
                             "rate_per_s": float | null,      # between two looks >= 1 s apart
                             "error_rate_per_s": float | null},
                "upstream_errors": {"refused": int, ...}}],
     "certificates": [{"site": str, "names": [str], "issuer": str, "source": str | null,
                       "serial": str | null, "not_before": str | null, "not_after": str | null,
                       "expires_in_seconds": int | null, "expires_in": str,
                       "stored_not_after": str, "next_renewal": str,
                       "last_attempt": str | null, "last_error": str | null, "failures": int,
                       "next_attempt": str | null,
                       "state": "ok" | "renewing" | "failing" | "expiring soon" | "expired"}],
     "protocols": {"HTTP/1.1": int, "HTTP/2.0": int, ...}}  # requests answered, per protocol

``not_before``/``not_after`` are those of the certificate being served now (a temporary one
while an ACME site waits for its first certificate); ``stored_not_after``, ``issuer``,
``next_renewal`` and ``last_error`` are exactly the ``tlsproxy certs`` columns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from acme_client.records import CertificateRecords, Metadata
from acme_client.schedule import renewal_due
from acme_client.storage import FileStorage
from proxy import metrics
from proxy.certs import acme_sites
from proxy.certs.sources import CertificateStatus, certificate_sites, describe_certificates
from proxy.certs.store import CertEntry, CertStore
from proxy.config import Config, Site, Upstream
from proxy.http.upstream import UpstreamPool

EXPIRING_SOON = timedelta(days=7)  # at most; short-lived certificates use a sixth of their life
MIN_RATE_WINDOW = 1.0  # seconds between the two samples a rate is computed from


def collect(
    config: Config,
    pool: UpstreamPool,
    store: CertStore,
    now: datetime | None = None,
    snapshots: list[dict[str, Any]] | None = None,
    origins: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole status document (blocking: reads certificate metadata from storage).

    ``snapshots`` are every worker's (proxy/admin/worker_status.py): with them the request counts
    and upstream health are the whole instance's, not this process's alone. ``origins``: site
    name -> where it came from, for sites that are not the file's (container labels).
    """
    now = datetime.now(UTC) if now is None else now
    view = _View.merged(snapshots) if snapshots else _View.local(pool)
    return {
        "generated_at": _iso(now),
        "pid": os.getpid(),
        "workers": config.server.workers,
        "scope": _scope(config.server.workers, snapshots),
        "sites": [
            _site(site, view, (origins or {}).get(site.name, "file")) for site in config.sites
        ],
        "certificates": _certificates(config, store, now),
        "protocols": _protocols(snapshots),
    }


def _protocols(snapshots: list[dict[str, Any]] | None) -> dict[str, int]:
    """Requests answered per client protocol (HTTP/1.1, HTTP/2.0, ...), all workers'."""
    counts: dict[str, float] = {}
    if snapshots:
        for snap in snapshots:
            for protocol, value in snap.get("protocols", []):
                counts[protocol] = counts.get(protocol, 0.0) + value
    else:
        counts = {p: v for (p,), v in metrics.REQUESTS_BY_PROTOCOL.values.items()}
    return {protocol: int(value) for protocol, value in sorted(counts.items())}


def _scope(workers: int | str, snapshots: list[dict[str, Any]] | None) -> str:
    """Whose numbers the page shows."""
    if workers == 1:
        return "the whole instance"
    if snapshots:
        return f"the whole instance ({len(snapshots)} worker processes, merged)"
    return (
        "one worker process: its own request counts and upstream health; "
        "certificates are shared through storage"
    )


class _View:
    """Request counts, upstream errors and failing upstreams: one process's, or merged."""

    def __init__(
        self,
        requests: dict[tuple[str, ...], float],
        errors: dict[tuple[str, ...], float],
        failing: Callable[[Upstream], tuple[float, str] | None],
    ) -> None:
        self.requests = requests
        self.errors = errors
        self.failing = failing

    @classmethod
    def local(cls, pool: UpstreamPool) -> _View:
        return cls(
            dict(metrics.REQUESTS.values), dict(metrics.UPSTREAM_ERRORS.values), pool.failing
        )

    @classmethod
    def merged(cls, snapshots: list[dict[str, Any]]) -> _View:
        requests: dict[tuple[str, ...], float] = {}
        errors: dict[tuple[str, ...], float] = {}
        failing: dict[str, tuple[float, str]] = {}
        for snap in snapshots:
            for site, label, value in snap.get("requests", []):
                requests[(site, label)] = requests.get((site, label), 0.0) + value
            for site, label, value in snap.get("upstream_errors", []):
                errors[(site, label)] = errors.get((site, label), 0.0) + value
            for url, (since, error) in snap.get("failing", {}).items():
                if url not in failing or since < failing[url][0]:
                    failing[url] = (since, error)
        return cls(requests, errors, lambda upstream: failing.get(upstream.url))


# -- sites -----------------------------------------------------------------------------------


def _site(site: Site, view: _View, source: str) -> dict[str, Any]:
    upstreams = [_upstream(u, view) for u in _all_upstreams(site)]
    failing = sum(1 for u in upstreams if u["state"] == "failing")
    state = "up" if not failing else ("down" if failing == len(upstreams) else "degraded")
    errors = view.errors
    return {
        "name": site.name,
        "hosts": list(site.hosts),
        "state": state,
        "source": source,
        "upstreams": upstreams,
        "requests": _requests(site.name, view),
        "upstream_errors": {k: int(v) for (s, k), v in sorted(errors.items()) if s == site.name},
    }


def _all_upstreams(site: Site) -> list[Upstream]:
    """The site's default upstreams, then its routes' (each once)."""
    found = [*site.upstreams, *(u for route in site.routes for u in route.upstreams)]
    return list(dict.fromkeys(found))


def _upstream(upstream: Upstream, view: _View) -> dict[str, Any]:
    failing = view.failing(upstream)
    if failing is None:
        return {"url": upstream.url, "state": "up", "failing_since": None, "last_error": None}
    since, error = failing
    return {
        "url": upstream.url,
        "state": "failing",
        "failing_since": _iso(datetime.fromtimestamp(since, UTC)),
        "last_error": error,
    }


class _Rates:
    """Request rates from two samples of the counters taken at least a second apart."""

    def __init__(self) -> None:
        self._previous: dict[str, tuple[float, float, float]] = {}  # site -> (t, total, 5xx)
        self._rates: dict[str, tuple[float, float]] = {}

    def update(self, site: str, total: float, errors: float) -> tuple[float, float] | None:
        now = time.monotonic()
        previous = self._previous.get(site)
        if previous is None or now - previous[0] >= MIN_RATE_WINDOW:
            self._previous[site] = (now, total, errors)
            if previous is not None:
                elapsed = now - previous[0]
                rates = ((total - previous[1]) / elapsed, (errors - previous[2]) / elapsed)
                self._rates[site] = rates
        return self._rates.get(site)


RATES = _Rates()


def _requests(site: str, view: _View) -> dict[str, Any]:
    by_class = {c: int(v) for (s, c), v in sorted(view.requests.items()) if s == site}
    total = sum(by_class.values())
    errors = by_class.get("5xx", 0)
    rates = RATES.update(site, total, errors)
    return {
        "total": total,
        "by_class": by_class,
        "errors_5xx": errors,
        "error_share": errors / total if total else None,
        "rate_per_s": round(rates[0], 3) if rates else None,
        "error_rate_per_s": round(rates[1], 3) if rates else None,
    }


# -- certificates ------------------------------------------------------------------------------


def _certificates(config: Config, store: CertStore, now: datetime) -> list[dict[str, Any]]:
    sites = certificate_sites(config.sites, config.tls)
    rows = describe_certificates(config.sites, config.tls, config.acme)
    metas = _acme_metadata(config, sites)
    return [
        _certificate(site, row, store.get(site.hosts[0]), metas.get(site.name), now)
        for site, row in zip(sites, rows, strict=True)
    ]


def _acme_metadata(config: Config, sites: list[Site]) -> dict[str, Metadata]:
    """Each ACME site's ``meta.json`` (last attempt, failures, next attempt)."""
    directory = config.tls.location.directory
    if directory is None:
        return {}
    records = CertificateRecords(FileStorage(directory), config.acme.cas[0].directory)
    found: dict[str, Metadata] = {}
    for site in sites:
        if acme_sites.uses_acme(site, config.tls):
            meta = records.meta(acme_sites.request_for(site).site)
            if meta is not None:
                found[site.name] = meta
    return found


def _certificate(
    site: Site,
    row: CertificateStatus,
    entry: CertEntry | None,
    meta: Metadata | None,
    now: datetime,
) -> dict[str, Any]:
    left = int((entry.not_after - now).total_seconds()) if entry is not None else None
    failures = meta.failures if meta is not None else (1 if row.last_error else 0)
    return {
        "site": site.name,
        "names": list(row.names),
        "issuer": row.issuer,
        "source": entry.source if entry is not None else None,
        "serial": entry.serial if entry is not None else None,
        "not_before": _iso(entry.not_before) if entry is not None else None,
        "not_after": _iso(entry.not_after) if entry is not None else None,
        "expires_in_seconds": left,
        "expires_in": countdown(left),
        "stored_not_after": row.not_after,
        "next_renewal": row.next_renewal,
        "last_attempt": _iso(meta.last_attempt) if meta and meta.last_attempt else None,
        "last_error": row.last_error,
        "failures": failures,
        "next_attempt": _iso(meta.next_attempt) if meta and meta.next_attempt else None,
        "state": certificate_state(entry, failures, row.last_error, now),
    }


def certificate_state(
    entry: CertEntry | None, failures: int, last_error: str | None, now: datetime
) -> str:
    """expired > failing > expiring soon > renewing > ok: the worst thing first."""
    if entry is None or now >= entry.not_after:
        return "expired"
    if failures and last_error:
        return "failing"
    lifetime = entry.not_after - entry.not_before
    if entry.not_after - now < min(EXPIRING_SOON, lifetime / 6):
        return "expiring soon"
    due = renewal_due(entry.not_before, entry.not_after)
    if entry.source == acme_sites.TEMPORARY_SOURCE or now >= due:
        return "renewing"
    return "ok"


def countdown(seconds: int | None) -> str:
    """``expires in 6 d 3 h`` / ``expired 2 h 5 m ago``: the two largest units."""
    if seconds is None:
        return "no certificate"
    parts = _units(abs(seconds))
    return f"expires in {parts}" if seconds > 0 else f"expired {parts} ago"


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def _units(seconds: int) -> str:
    """The largest unit that fits, then the next one unless it is zero."""
    for index, (unit, size) in enumerate(_UNITS):
        if seconds >= size or unit == "s":
            text = f"{seconds // size} {unit}"
            if index + 1 < len(_UNITS):
                next_unit, next_size = _UNITS[index + 1]
                rest = seconds % size // next_size
                text += f" {rest} {next_unit}" if rest else ""
            return text
    return "0 s"


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")
