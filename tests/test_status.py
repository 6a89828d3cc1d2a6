"""The status document (``GET /api/status``), its HTML rendering, and the admin token rule.

The document is built from real parts: an internal CA's certificates in a real CertStore, an
ACME metadata file in storage, the upstream pool's passive health and the metric counters.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from acme_client.records import CertificateRecords, Metadata
from acme_client.storage import FileStorage
from proxy import metrics
from proxy.admin import status, status_page
from proxy.certs.acme_sites import TEMPORARY_SOURCE, request_for
from proxy.certs.internal_ca import InternalCA
from proxy.certs.sources import describe_certificates
from proxy.certs.store import CertStore, make_entry
from proxy.config import Address, Config, ServerConfig, Upstream, parse_config, start_problems
from proxy.envconfig import parse_with_env
from proxy.http.upstream import UpstreamPool
from proxy.server import _authorized, admin_exposure
from tests.support import ProxyProcess, RefusingPort, free_port, wait_for_port

EVIL = "<script>document.title='owned'</script>"
DIRECTORY = "https://ca.example/directory"


def _config(storage: Path, issuer: str = "acme") -> Config:
    return parse_config(
        {
            "tls": {"storage": str(storage), "issuer": issuer},
            "acme": {"directory": DIRECTORY},
            "sites": [
                {"hosts": ["good.test"], "upstreams": ["http://127.0.0.1:8001"]},
                {"hosts": ["bad.test", "www.bad.test"], "upstreams": ["http://127.0.0.1:8002"]},
            ],
        }
    )


def _store(ca: InternalCA, lifetime: timedelta, *names: str, source: str) -> CertStore:
    store = CertStore()
    chain, key = ca.issue(names, lifetime)
    store.install_entry(make_entry(names, chain, key, issuer="internal", source=source))
    return store


@pytest.fixture
def world(tmp_path: Path) -> tuple[Config, UpstreamPool, CertStore]:
    """good.test: healthy, certificate fine; bad.test: upstream refused, ACME order failed."""
    config = _config(tmp_path / "data")
    ca = InternalCA.load_or_create(tmp_path / "data" / "ca")
    store = _store(ca, timedelta(days=90), "good.test", source=DIRECTORY)
    chain, key = ca.issue(("bad.test", "www.bad.test"), timedelta(days=7))
    temporary = make_entry(
        ("bad.test", "www.bad.test"), chain, key, issuer="internal", source=TEMPORARY_SOURCE
    )
    store.install_entry(temporary)
    records = CertificateRecords(FileStorage(str(tmp_path / "data")), DIRECTORY)
    now = datetime.now(UTC)
    meta = Metadata(
        ("bad.test", "www.bad.test"),
        DIRECTORY,
        last_attempt=now,
        last_error=f"urn:ietf:params:acme:error:serverInternal: {EVIL}",
        failures=2,
        next_attempt=now + timedelta(minutes=5),
    )
    records.save_meta(request_for(config.sites[1]).site, meta)
    pool = UpstreamPool(1.0)
    pool.mark_down(Upstream("127.0.0.1", 8002), "Connection refused")
    metrics.request_done("good.test", 200)
    metrics.request_done("bad.test", 502)
    return config, pool, store


def test_the_document_shows_health_requests_and_certificate_states(
    world: tuple[Config, UpstreamPool, CertStore],
) -> None:
    document = status.collect(*world)
    json.dumps(document)  # JSON-able as it is
    good, bad = document["sites"]
    assert (good["name"], good["state"], good["upstreams"][0]["state"]) == ("good.test", "up", "up")
    assert bad["state"] == "down"
    upstream = bad["upstreams"][0]
    assert upstream["url"] == "http://127.0.0.1:8002"
    assert upstream["last_error"] == "Connection refused"
    assert upstream["failing_since"] is not None
    assert bad["requests"]["errors_5xx"] >= 1
    assert good["requests"]["by_class"]["2xx"] >= 1
    good_cert, bad_cert = document["certificates"]
    assert good_cert["state"] == "ok"
    assert good_cert["expires_in"].startswith("expires in 89 d")
    assert bad_cert["state"] == "failing"
    assert bad_cert["last_error"].endswith(EVIL)  # the CA's text, in full
    assert bad_cert["failures"] == 2 and bad_cert["next_attempt"] is not None
    assert bad_cert["source"] == TEMPORARY_SOURCE


def test_the_document_agrees_with_the_certs_command(
    world: tuple[Config, UpstreamPool, CertStore],
) -> None:
    config = world[0]
    rows = describe_certificates(config.sites, config.tls, config.acme)
    certificates = status.collect(*world)["certificates"]
    for row, cert in zip(rows, certificates, strict=True):
        assert tuple(cert["names"]) == row.names
        assert cert["issuer"] == row.issuer
        assert cert["stored_not_after"] == row.not_after
        assert cert["next_renewal"] == row.next_renewal
        assert cert["last_error"] == row.last_error


def test_no_secret_reaches_the_document(
    world: tuple[Config, UpstreamPool, CertStore], tmp_path: Path
) -> None:
    text = json.dumps(status.collect(*world))
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    root_key = (tmp_path / "data" / "ca" / "root.key").read_text()
    assert root_key.splitlines()[1] not in text


def test_certificate_states_and_countdowns(tmp_path: Path) -> None:
    ca = InternalCA.load_or_create(tmp_path / "ca")
    entry = _store(ca, timedelta(days=90), "a.test", source="x").get("a.test")
    assert entry is not None
    state = status.certificate_state
    now = entry.not_before + timedelta(minutes=5)
    assert state(entry, 0, None, now) == "ok"
    assert state(entry, 0, None, entry.not_after - timedelta(days=20)) == "renewing"
    assert state(entry, 0, None, entry.not_after - timedelta(days=2)) == "expiring soon"
    assert state(entry, 1, "CA down", now) == "failing"
    assert state(entry, 1, "CA down", entry.not_after) == "expired"
    assert state(None, 0, None, now) == "expired"
    assert status.countdown(6 * 86400 + 3 * 3600 + 59) == "expires in 6 d 3 h"
    assert status.countdown(-7300) == "expired 2 h 1 m ago"


def test_untrusted_text_is_rendered_as_text(world: tuple[Config, UpstreamPool, CertStore]) -> None:
    document = status.collect(*world)
    document["sites"][0]["name"] = EVIL
    document["sites"][1]["upstreams"][0]["last_error"] = EVIL
    page = status_page.render(document)
    assert "<script" not in page.lower()
    assert page.count(status_page._e(EVIL)) == 4  # site name in a cell and attribute, 2 errors
    assert "✖ FAILING" in page and "✖ DOWN" in page and "✔ OK" in page
    answer = status_page.html_answer(document)
    assert dict(answer.headers)[b"content-security-policy"].startswith(b"default-src 'none'")


def test_the_token_check() -> None:
    basic = base64.b64encode(b"admin:s3cret")
    assert _authorized("s3cret", [(b"authorization", b"Bearer s3cret")])
    assert _authorized("s3cret", [(b"authorization", b"Basic " + basic)])
    assert not _authorized("s3cret", [(b"authorization", b"Bearer wrong")])
    assert not _authorized("s3cret", [(b"authorization", b"Basic !!")])
    assert not _authorized("s3cret", [(b"host", b"x")])


def test_a_non_loopback_admin_listener_needs_a_token(tmp_path: Path) -> None:
    def problems(server: dict[str, Any]) -> list[str]:
        data = {"server": server, "tls": {"storage": str(tmp_path), "issuer": "internal"}}
        sites = [{"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"]}]
        return start_problems(parse_config({**data, "sites": sites}))

    assert problems({}) == []
    refused = problems({"admin_listen": "0.0.0.0:9901"})
    assert len(refused) == 1 and "server.admin_token" in refused[0]
    assert problems({"admin_listen": "0.0.0.0:9901", "admin_token": "t"}) == []
    assert problems({"admin_listen": "[::1]:9901"}) == []
    sites = [{"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"]}]
    config = parse_with_env({"sites": sites}, {"TLSPROXY_ADMIN_TOKEN": "from-env"})
    assert config.server.admin_token == "from-env"


def test_the_log_says_what_an_admin_listener_off_loopback_opens() -> None:
    """A token protects everything but /healthz: an info line saying so, not a warning that
    /metrics is open to the network."""
    protected = ServerConfig(admin_listen=Address("0.0.0.0", 9901), admin_token="t")
    level, line = admin_exposure(protected) or (0, "")
    assert level == logging.INFO
    assert line == (
        "admin listener on 0.0.0.0:9901: /healthz answers anyone on that network; the status "
        "page, /api/status and /metrics need the admin token"
    )
    open_to_all = dataclasses.replace(protected, admin_token="")
    level, line = admin_exposure(open_to_all) or (0, "")
    assert level == logging.WARNING
    assert "/api/status, /metrics and /healthz answer anyone" in line and "no admin_token" in line
    assert admin_exposure(ServerConfig()) is None  # 127.0.0.1: nothing to say
    assert admin_exposure(dataclasses.replace(protected, admin_listen=None)) is None


def test_with_several_workers_the_page_says_it_shows_one(
    world: tuple[Config, UpstreamPool, CertStore],
) -> None:
    config, pool, store = world
    assert status.collect(config, pool, store)["scope"] == "the whole instance"
    several = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=4))
    assert status.collect(several, pool, store)["scope"].startswith("one worker process")


def _get(url: str, token: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def test_a_running_proxy_answers_only_with_the_token(tmp_path: Path) -> None:
    admin = free_port()
    down = RefusingPort()
    proxy = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["a.test"], "upstreams": [down.url]}],
        server={"admin_listen": f"127.0.0.1:{admin}", "admin_token": "s3cret"},
    )
    try:
        wait_for_port(admin)
        base = f"http://127.0.0.1:{admin}"
        assert _get(base + "/healthz")[0] == 200  # probes need no token
        for path in ("/", "/api/status", "/metrics"):
            assert _get(base + path)[0] == 401
            assert _get(base + path, "wrong")[0] == 401
        code, kind, body = _get(base + "/api/status", "s3cret")
        assert (code, kind) == (200, "application/json")
        document = json.loads(body)
        assert document["sites"][0]["hosts"] == ["a.test"]
        assert document["certificates"][0]["issuer"] == "internal"
        assert "s3cret" not in body.decode()
        code, kind, page = _get(base + "/", "s3cret")
        assert code == 200 and kind.startswith("text/html")
        assert b"a.test" in page
    finally:
        proxy.stop()
        down.close()
