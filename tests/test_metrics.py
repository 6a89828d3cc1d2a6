"""Prometheus metrics: the registry's text format, and ``/metrics`` on a real proxy's admin
listener, scraped and parsed strictly (``tests/promparse.py``) while real clients connect.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from cryptography import x509

from proxy import metrics
from proxy.config import ServerConfig
from proxy.server import _is_loopback
from tests.promparse import Exposition, parse, scrape
from tests.support import (
    ProxyProcess,
    RawUpstream,
    RefusingPort,
    free_port,
    https_request,
    wait_until,
)

# -- the registry --------------------------------------------------------------------------


def test_counters_gauges_and_labels_render_in_the_text_format() -> None:
    registry = metrics.Registry()
    hits = registry.counter("t_hits_total", "Hits.\nTwo lines.", ["site", "code_class"])
    temperature = registry.gauge("t_temperature", "A gauge.")
    hits.inc(("a.test", "2xx"))
    hits.inc(("a.test", "2xx"), 2)
    hits.inc(('we"ird\\site\n', "5xx"))
    temperature.set(-1.5)
    text = registry.render().decode()
    page = parse(text)
    assert page.types == {"t_hits_total": "counter", "t_temperature": "gauge"}
    assert page.helps["t_hits_total"] == "Hits.\\nTwo lines."
    assert page.value("t_hits_total", site="a.test", code_class="2xx") == 3
    assert page.value("t_hits_total", site='we"ird\\site\n', code_class="5xx") == 1
    assert page.value("t_temperature") == -1.5
    assert 't_hits_total{site="a.test",code_class="2xx"} 3\n' in text
    with pytest.raises(ValueError, match="registered twice"):
        registry.gauge("t_temperature", "again")


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = metrics.Registry()
    latency = registry.histogram("t_seconds", "Latency.", ["site"], [0.1, 1, 10])
    for value in [0.05, 0.1, 0.5, 1, 3, 60]:  # a value equal to a bound falls in its bucket
        latency.observe(value, ("a.test",))
    latency.observe(0.2, ("b.test",))
    page = parse(registry.render().decode())
    buckets = {
        dict(labels)["le"]: count
        for labels, count in page.series("t_seconds_bucket").items()
        if ("site", "a.test") in labels
    }
    assert buckets == {"0.1": 2, "1": 4, "10": 5, "+Inf": 6}
    assert page.value("t_seconds_count", site="a.test") == 6
    assert math.isclose(page.value("t_seconds_sum", site="a.test"), 64.65)
    assert page.value("t_seconds_bucket", site="b.test", le="1") == 1


def test_data_path_helpers_count_by_site_class_and_kind() -> None:
    def requests(site: str, code_class: str) -> float:
        return metrics.REQUESTS.value((site, code_class))

    before = {c: requests("m.test", c) for c in ["1xx", "2xx", "4xx", "5xx", "other"]}
    for status in [101, 200, 204, 421, 502, 504, 0, 999]:
        metrics.request_done("m.test", status)
    after = {c: requests("m.test", c) for c in before}
    assert {c: after[c] - before[c] for c in after} == {
        "1xx": 1,
        "2xx": 2,
        "4xx": 1,
        "5xx": 2,
        "other": 2,
    }
    errors = metrics.UPSTREAM_ERRORS.value(("m.test", "refused"))
    metrics.upstream_error("m.test", "refused")
    assert metrics.UPSTREAM_ERRORS.value(("m.test", "refused")) == errors + 1
    count = metrics.UPSTREAM_SECONDS.series.get(("m.test",), [0.0])[-2:]
    metrics.upstream_response("m.test", 0.02)
    assert metrics.UPSTREAM_SECONDS.series[("m.test",)][-1] == pytest.approx(count[-1] + 0.02)
    renewals = metrics.ACME_RENEWALS.value(("failure",))
    metrics.acme_renewal(success=False)
    assert metrics.ACME_RENEWALS.value(("failure",)) == renewals + 1


def test_the_whole_default_registry_parses() -> None:
    page = parse(metrics.REGISTRY.render().decode())
    assert page.types == {
        "tlsproxy_requests_total": "counter",
        "tlsproxy_requests_by_protocol_total": "counter",
        "tlsproxy_upstream_response_seconds": "histogram",
        "tlsproxy_upstream_errors_total": "counter",
        "tlsproxy_upstream_retries_total": "counter",
        "tlsproxy_tls_handshake_failures_total": "counter",
        "tlsproxy_connections_refused_total": "counter",
        "tlsproxy_acme_renewals_total": "counter",
        "tlsproxy_storage_up": "gauge",
        "tlsproxy_storage_outages_total": "counter",
    }
    assert all(len(help) > 10 for help in page.helps.values())  # each says what it counts


def test_admin_listens_on_loopback_unless_told_otherwise() -> None:
    admin = ServerConfig().admin_listen
    assert admin is not None and _is_loopback(admin.host)
    assert _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.0.2.1")


# -- /metrics on a running proxy -------------------------------------------------------

HANDSHAKE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def refusing() -> Iterator[RefusingPort]:
    port = RefusingPort()
    yield port
    port.close()


class Running:
    def __init__(self, process: ProxyProcess, admin: int) -> None:
        self.process = process
        self.admin = admin

    def scrape(self) -> Exposition:
        content_type, page = scrape(self.admin)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        return page

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.process.https_port), timeout=5)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def proxy(
    request: pytest.FixtureRequest,
    upstream: RawUpstream,
    refusing: RefusingPort,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp(f"metrics-{request.param}")
    admin = free_port()
    server = {
        "loop": request.param,
        "admin_listen": f"127.0.0.1:{admin}",
        "handshake_timeout": HANDSHAKE_TIMEOUT,
        "unknown_sni": "reject",
    }
    sites: list[dict[str, object]] = [
        {"hosts": ["app.test", "www.app.test"], "upstreams": [upstream.url]},
        {"hosts": ["down.test"], "upstreams": [refusing.url]},
    ]
    process = ProxyProcess.start(directory, sites, server=server)
    yield Running(process, admin)
    assert process.stop() == 0, process.log()
    assert "Traceback" not in process.log(), process.log()


def test_metrics_and_health_on_the_admin_listener(proxy: Running) -> None:
    page = proxy.scrape()
    assert "tlsproxy_requests_total" in page.types
    assert page.types["tlsproxy_open_connections"] == "gauge"
    assert page.types["tlsproxy_certificate_not_after_seconds"] == "gauge"
    assert _get(proxy.admin, "/healthz") == (200, b"ok\n")
    assert _get(proxy.admin, "/nothing")[0] == 404


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_certificate_not_after_per_name(proxy: Running) -> None:
    context = proxy.process.client_context()
    with proxy.connect() as sock, context.wrap_socket(sock, server_hostname="app.test") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    served = x509.load_der_x509_certificate(der).not_valid_after_utc
    page = proxy.scrape()
    for name in ["app.test", "www.app.test"]:
        value = page.value("tlsproxy_certificate_not_after_seconds", name=name, issuer="internal")
        assert value == served.timestamp()
    down = page.value("tlsproxy_certificate_not_after_seconds", name="down.test", issuer="internal")
    assert datetime.fromtimestamp(down, UTC) > datetime.now(UTC)


def _open(proxy: Running) -> float:
    return proxy.scrape().value("tlsproxy_open_connections")


def test_open_connections_counts_handshakes_and_established_connections(proxy: Running) -> None:
    wait_until(lambda: _open(proxy) == 0, timeout=HANDSHAKE_TIMEOUT + 3)
    context = proxy.process.client_context()
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            sock = stack.enter_context(proxy.connect())
            stack.enter_context(context.wrap_socket(sock, server_hostname="app.test"))
        stack.enter_context(proxy.connect())  # still in its handshake: open too
        wait_until(lambda: _open(proxy) == 4, timeout=5)
    wait_until(lambda: _open(proxy) == 0, timeout=HANDSHAKE_TIMEOUT + 3)


def _failures(page: Exposition) -> dict[str, float]:
    reasons = ["timeout", "protocol", "unknown_sni", "other"]
    return {r: page.value("tlsproxy_tls_handshake_failures_total", reason=r) for r in reasons}


def test_handshake_failures_are_counted_by_reason(proxy: Running) -> None:
    wait_until(lambda: _open(proxy) == 0, timeout=HANDSHAKE_TIMEOUT + 3)  # earlier ones ended
    before = _failures(proxy.scrape())
    context = proxy.process.client_context()
    context.check_hostname = False
    with proxy.connect() as sock, pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        context.wrap_socket(sock, server_hostname="unknown.test")
    with proxy.connect() as sock:  # plain HTTP: a protocol failure
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    with proxy.connect() as sock:  # a client that leaves mid-handshake
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")
        time.sleep(0.1)
    stalled = [proxy.connect() for _ in range(3)]
    try:
        time.sleep(HANDSHAKE_TIMEOUT + 0.7)  # the deadline plus the gate's grace
        after = _failures(proxy.scrape())
    finally:
        for sock in stalled:
            sock.close()
    grown = {reason: after[reason] - before[reason] for reason in after}
    assert grown["unknown_sni"] == 1
    assert grown["protocol"] == 1
    # uvloop reports the vanished client at once ("other"); the default loop only frees it in
    # a garbage collection, so there it may be counted when its deadline passes instead.
    assert grown["timeout"] + grown["other"] == 4
    assert grown["timeout"] >= 3


def test_requests_latency_and_upstream_errors_are_counted(proxy: Running) -> None:
    before = proxy.scrape()
    for _ in range(3):
        reply = https_request(proxy.process, "app.test", _get_request("app.test"))
        assert reply.startswith(b"HTTP/1.1 200 ")
    reply = https_request(proxy.process, "down.test", _get_request("down.test"))
    assert reply.startswith(b"HTTP/1.1 502 ")
    after = proxy.scrape()

    def grown(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert grown("tlsproxy_requests_total", site="app.test", code_class="2xx") == 3
    assert grown("tlsproxy_requests_total", site="down.test", code_class="5xx") == 1
    assert grown("tlsproxy_upstream_response_seconds_count", site="app.test") == 3
    assert grown("tlsproxy_upstream_errors_total", site="down.test", kind="refused") >= 1


def _get_request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
