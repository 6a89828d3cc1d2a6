"""Prometheus metrics without a dependency: counters, gauges and histograms, text format 0.0.4.

The data path counts on every request, so an update is a dict lookup and an add on a tuple
key: no locks (the event loop is one thread), no string formatting. Everything is rendered
only when ``/metrics`` is scraped. Label values must come from bounded sets (configured site
names, a fixed list of reasons), never from client input such as the Host header.

The process-wide metrics are module globals (like ``prometheus_client``'s default registry)
so that the data path needs no plumbing; values that belong to one ``Proxy`` (open
connections, certificates) are built at scrape time and passed to :meth:`Registry.render`.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Literal, Protocol, TypeVar

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[str, ...]


class Metric(Protocol):
    name: str

    def lines(self) -> Iterator[str]:
        """The metric's HELP, TYPE and sample lines."""
        ...


M = TypeVar("M", bound=Metric)


class _Simple:
    """A counter or gauge: one float per label set."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)
        self.values: dict[Labels, float] = {}

    def value(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0.0)

    def lines(self) -> Iterator[str]:
        yield from _header(self.name, self.help, self.kind)
        for labels, value in sorted(list(self.values.items())):
            yield f"{self.name}{_labels(self.labelnames, labels)} {_number(value)}"


class Counter(_Simple):
    """Only goes up; the name should end in ``_total``."""

    kind = "counter"

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount


class Gauge(_Simple):
    """A value that is set (usually at scrape time)."""

    kind = "gauge"

    def set(self, value: float, labels: Labels = ()) -> None:
        self.values[labels] = value


class Histogram:
    """Observations counted into fixed buckets, plus their sum and count, per label set."""

    def __init__(
        self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)
        self.bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        # per label set: one count per bucket (not cumulative) + the +Inf bucket, then the sum
        self.series: dict[Labels, list[float]] = {}

    def observe(self, value: float, labels: Labels = ()) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect.bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def lines(self) -> Iterator[str]:
        yield from _header(self.name, self.help, "histogram")
        names = (*self.labelnames, "le")
        for labels, series in sorted(list(self.series.items())):
            counts = series[:-1]
            cumulative = 0.0
            for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
                cumulative += count
                le = _labels(names, (*labels, _number(bound)))
                yield f"{self.name}_bucket{le} {_number(cumulative)}"
            plain = _labels(self.labelnames, labels)
            yield f"{self.name}_sum{plain} {_number(series[-1])}"
            yield f"{self.name}_count{plain} {_number(cumulative)}"


class Registry:
    """The metrics one ``/metrics`` page shows, in registration order."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labels))

    def histogram(
        self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))

    def _add(self, metric: M) -> M:
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics.append(metric)
        return metric

    def render(self, extra: Iterable[Metric] = ()) -> bytes:
        """The text exposition of every registered metric, then ``extra``."""
        lines = [line for m in (*self.metrics, *extra) for line in m.lines()]
        return ("\n".join(lines) + "\n").encode()


def _header(name: str, help: str, kind: str) -> Iterator[str]:
    escaped = help.replace("\\", "\\\\").replace("\n", "\\n")
    yield f"# HELP {name} {escaped}"
    yield f"# TYPE {name} {kind}"


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# -- the proxy's metrics -------------------------------------------------------------------

REGISTRY = Registry()

REQUESTS = REGISTRY.counter(
    "tlsproxy_requests_total",
    "Requests answered, by site and status class (site '-': no site matched).",
    ["site", "code_class"],
)
REQUESTS_BY_PROTOCOL = REGISTRY.counter(
    "tlsproxy_requests_by_protocol_total",
    "Requests answered, by the protocol the client spoke: HTTP/1.0, HTTP/1.1, HTTP/2.0.",
    ["protocol"],
)
UPSTREAM_SECONDS = REGISTRY.histogram(
    "tlsproxy_upstream_response_seconds",
    "From sending a request upstream (connecting included) to the upstream's response head.",
    ["site"],
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
)
UPSTREAM_ERRORS = REGISTRY.counter(
    "tlsproxy_upstream_errors_total",
    "Upstream failures by kind: refused, timeout, reset, invalid.",
    ["site", "kind"],
)
UPSTREAM_RETRIES = REGISTRY.counter(
    "tlsproxy_upstream_retries_total",
    "Idempotent requests sent again on a new connection after a pooled upstream connection "
    "closed before any byte of a response.",
    ["site"],
)
HANDSHAKE_FAILURES = REGISTRY.counter(
    "tlsproxy_tls_handshake_failures_total",
    "TLS handshakes that did not complete, by reason: timeout, protocol, unknown_sni, other.",
    ["reason"],
)
CONNECTIONS_REFUSED = REGISTRY.counter(
    "tlsproxy_connections_refused_total",
    "Client connections closed at accept because max_connections were open.",
)
ACME_RENEWALS = REGISTRY.counter(
    "tlsproxy_acme_renewals_total",
    "Certificate issuances and renewals through ACME, by result: success, failure.",
    ["result"],
)
STORAGE_UP = REGISTRY.gauge(
    "tlsproxy_storage_up",
    "1 while shared (Redis) storage answers, 0 while it is unreachable; absent for files.",
)
STORAGE_OUTAGES = REGISTRY.counter(
    "tlsproxy_storage_outages_total",
    "Times shared (Redis) storage became unreachable.",
)

_CODE_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
UpstreamError = Literal["refused", "timeout", "reset", "invalid"]
HandshakeFailure = Literal["timeout", "protocol", "unknown_sni", "other"]
_acme_lock = threading.Lock()


_PROTOCOLS = {b"1.1": ("HTTP/1.1",), b"2.0": ("HTTP/2.0",), b"1.0": ("HTTP/1.0",)}


def request_done(site: str, status: int, version: bytes = b"1.1") -> None:
    """Count one answered request (``site`` is the site's name, "-" when none matched;
    ``version`` the client's HTTP version as its protocol layer parsed it)."""
    code_class = _CODE_CLASSES[status // 100] if 100 <= status < 600 else "other"
    values = REQUESTS.values
    key = (site, code_class)
    values[key] = values.get(key, 0.0) + 1.0
    protocol = _PROTOCOLS.get(version, ("other",))
    values = REQUESTS_BY_PROTOCOL.values
    values[protocol] = values.get(protocol, 0.0) + 1.0


def upstream_response(site: str, seconds: float) -> None:
    """Record how long the upstream took to start its response."""
    UPSTREAM_SECONDS.observe(seconds, (site,))


def upstream_error(site: str, kind: UpstreamError) -> None:
    """Count an upstream failure: refused (connect failed), timeout (connect or response),
    reset (closed or reset before the response ended), invalid (unparsable response)."""
    values = UPSTREAM_ERRORS.values
    key = (site, kind)
    values[key] = values.get(key, 0.0) + 1.0


def upstream_retry(site: str) -> None:
    UPSTREAM_RETRIES.inc((site,))


def handshake_failed(reason: HandshakeFailure) -> None:
    HANDSHAKE_FAILURES.inc((reason,))


def acme_renewal(success: bool) -> None:
    """Count one ACME issuance or renewal attempt; safe to call from a worker thread."""
    with _acme_lock:
        ACME_RENEWALS.inc(("success" if success else "failure",))


def storage_up(up: bool) -> None:
    """Shared storage became reachable (True) or unreachable (False); any thread."""
    with _acme_lock:
        STORAGE_UP.set(1.0 if up else 0.0)
        if not up:
            STORAGE_OUTAGES.inc()


# -- per-proxy values, built at scrape time ------------------------------------------------


class _Named(Protocol):
    """What the certificate gauge needs of ``proxy.certs.store.CertEntry``."""

    @property
    def names(self) -> tuple[str, ...]: ...
    @property
    def issuer(self) -> str: ...
    @property
    def not_after(self) -> datetime: ...


def open_connections(count: int) -> Gauge:
    gauge = Gauge(
        "tlsproxy_open_connections",
        "Client connections open on the TLS listeners (handshaking or established).",
    )
    gauge.set(count)
    return gauge


def certificates(entries: Iterable[_Named]) -> Gauge:
    gauge = Gauge(
        "tlsproxy_certificate_not_after_seconds",
        "When each served certificate expires (Unix time), by name and issuer.",
        ["name", "issuer"],
    )
    for entry in entries:
        for name in entry.names:
            gauge.set(entry.not_after.timestamp(), (name, entry.issuer))
    return gauge
