"""The ``tlsproxy`` command as a user runs it: ``python -m proxy ...`` in a real subprocess."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import (
    ROOT,
    ProxyProcess,
    UvicornApp,
    free_port,
    stop_process,
    to_toml,
    wait_for_port,
)


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


def tlsproxy(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(
    path: Path,
    sites: list[dict[str, Any]],
    *,
    server: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
) -> tuple[Path, int]:
    """A config on a free loopback port (no port 80, no admin); returns (file, https port)."""
    https_port = free_port()
    settings: dict[str, Any] = {
        "https_listen": [f"127.0.0.1:{https_port}"],
        "http_listen": [],
        "admin_listen": "",
        **(server or {}),
    }
    tls_settings = {"storage": str(path.parent / "data"), "issuer": "internal", **(tls or {})}
    path.write_text(to_toml({"server": settings, "tls": tls_settings, "sites": sites}))
    return path, https_port


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


GOOD_SITES: list[dict[str, Any]] = [
    {"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"]},
    {"hosts": ["b.test", "*.b.test"], "upstreams": ["http://127.0.0.1:8001"]},
]


# -- check ------------------------------------------------------------------------------


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    config, _ = write_config(tmp_path / "good.toml", GOOD_SITES)
    result = tlsproxy("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert not (tmp_path / "data").exists(), "check must not create storage or certificates"


def test_check_names_every_bad_key_and_exits_2(tmp_path: Path) -> None:
    sites: list[dict[str, Any]] = [
        {"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"], "colour": "blue"},
        {"hosts": ["b.test"], "upstreams": ["ftp://x"]},
    ]
    config, _ = write_config(tmp_path / "bad.toml", sites)
    result = tlsproxy("check", "--config", str(config))
    assert result.returncode == 2
    assert "OK" not in result.stdout
    lines = result.stderr.splitlines()
    assert any(line.startswith("tlsproxy: sites[1].upstreams[0]: ") for line in lines), lines
    assert any("sites[0]" in line and "'colour'" in line for line in lines), lines
    assert "Traceback" not in result.stderr


# -- run refusing to start ----------------------------------------------------------------


def test_run_refuses_a_bad_config_and_listens_on_nothing(tmp_path: Path) -> None:
    sites = [{"hosts": ["a.test"], "upstreams": ["ftp://x"]}]
    config, port = write_config(tmp_path / "bad.toml", sites, server={"bogus": 1})
    result = tlsproxy("run", "--config", str(config))
    assert result.returncode == 2
    assert "sites[0].upstreams[0]" in result.stderr
    assert "'bogus'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stderr
    assert refuses(port)


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize(
    ("server", "tls", "key"),
    [
        ({}, {"storage": "memcached://127.0.0.1:11211"}, "tls.storage"),
    ],
    ids=["unknown-storage"],
)
def test_features_not_available_yet_are_refused_up_front(
    tmp_path: Path, command: str, server: dict[str, Any], tls: dict[str, Any], key: str
) -> None:
    sites = [{"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"]}]
    config, port = write_config(tmp_path / "later.toml", sites, server=server, tls=tls)
    result = tlsproxy(command, "--config", str(config))
    assert result.returncode == 2
    assert key in result.stderr
    assert "not available yet" in result.stderr
    assert "Traceback" not in result.stderr
    assert refuses(port)


def _pair(directory: Path, cert: bytes, key: bytes) -> dict[str, str]:
    directory.mkdir(exist_ok=True)
    (directory / "fullchain.pem").write_bytes(cert)
    (directory / "privkey.pem").write_bytes(key)
    return {"cert": str(directory / "fullchain.pem"), "key": str(directory / "privkey.pem")}


def _leaf(name: str = "a.test") -> tuple[bytes, bytes]:
    leaf = trustme.CA().issue_cert(name)
    return leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()


def _missing_files(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    missing = tmp / "missing"
    files = {"cert": str(missing / "fullchain.pem"), "key": str(missing / "privkey.pem")}
    return files, {}


def _mismatched_pair(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return _pair(tmp / "files", _leaf()[0], _leaf()[1]), {}


def _not_pem(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return _pair(tmp / "files", b"not a certificate\n", _leaf()[1]), {}


def _storage_under_a_file(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    (tmp / "afile").write_text("")
    return {}, {"storage": str(tmp / "afile" / "data")}


def _storage_is_a_file(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    (tmp / "afile").write_text("")
    return {}, {"storage": str(tmp / "afile")}


def _broken_ca(issuer: str) -> Any:
    def prepare(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        (tmp / "data" / "ca").mkdir(parents=True)
        (tmp / "data" / "ca" / "root.pem").write_text("half a CA: the key is missing\n")
        return {}, {"storage": str(tmp / "data"), "issuer": issuer}

    return prepare


def _internal_ca_on_redis(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return {}, {"storage": "redis://127.0.0.1:1/0"}


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        pytest.param(
            _missing_files,
            ["sites[0].cert: cannot read ", "sites[0].key: cannot read "],
            id="missing-files",
        ),
        pytest.param(
            _mismatched_pair,
            ["sites[0].key: ", "is not the key of the certificate in"],
            id="mismatched-pair",
        ),
        pytest.param(_not_pem, ["sites[0].cert: no PEM certificate in "], id="not-pem"),
        pytest.param(
            _storage_under_a_file,
            ["tls.storage: cannot create ", "is not a directory"],
            id="storage-under-a-file",
        ),
        pytest.param(
            _storage_is_a_file, ["tls.storage: ", "is not a directory"], id="storage-is-a-file"
        ),
        pytest.param(
            _broken_ca("internal"),
            ["tls.storage: internal CA in ", "never replaced"],
            id="half-a-ca-internal",
        ),
        pytest.param(
            _broken_ca("acme"),  # needed for the temporary certificate: none is stored
            ["tls.storage: internal CA in ", "never replaced"],
            id="half-a-ca-acme",
        ),
        pytest.param(
            _internal_ca_on_redis, ['tls.issuer: "internal" keeps its CA'], id="internal-on-redis"
        ),
    ],
)
def test_check_finds_what_run_refuses(
    tmp_path: Path,
    prepare: Callable[[Path], tuple[dict[str, Any], dict[str, Any]]],
    expected: list[str],
) -> None:
    """Newcomers ran `check` (OK), then `run` refused the same file: check must say first."""
    site_extra, tls = prepare(tmp_path)
    sites = [{"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"], **site_extra}]
    config, port = write_config(tmp_path / "proxy.toml", sites, tls=tls)
    checked = tlsproxy("check", "--config", str(config))
    ran = tlsproxy("run", "--config", str(config))
    for result in (checked, ran):
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        for text in expected:
            assert text in result.stderr, result.stderr
    assert "OK" not in checked.stdout
    problems = [line for line in ran.stderr.splitlines() if line.startswith("tlsproxy: ")]
    assert problems == checked.stderr.splitlines(), "run and check disagree"
    assert refuses(port)
    if not tls.get("storage", "").startswith("redis"):
        assert not (tmp_path / "data" / "certificates").exists(), "check wrote to storage"


def test_check_accepts_certificate_files_that_run_can_use(tmp_path: Path) -> None:
    sites = [
        {
            "hosts": ["a.test"],
            "upstreams": ["http://127.0.0.1:8000"],
            **_pair(tmp_path / "files", *_leaf()),
        }
    ]
    config, _ = write_config(tmp_path / "proxy.toml", sites, tls={"storage": str(tmp_path / "x")})
    result = tlsproxy("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


# -- reverse-proxy ------------------------------------------------------------------------


@dataclass
class OneLiner:
    """A running ``tlsproxy reverse-proxy --from rp.test --internal`` on loopback ports."""

    https_port: int
    http_port: int
    storage: Path
    log_path: Path

    def curl(self, url: str, *args: str) -> subprocess.CompletedProcess[str]:
        """curl resolving rp.test to loopback on both ports, trusting the internal CA."""
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(self.storage / "ca" / "root.pem"),
                "--resolve",
                f"rp.test:{self.https_port}:127.0.0.1",
                "--resolve",
                f"rp.test:{self.http_port}:127.0.0.1",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


@contextlib.contextmanager
def one_liner(app: UvicornApp, tmp_path: Path, *extra: str) -> Iterator[OneLiner]:
    https_port, http_port = free_port(), free_port()
    running = OneLiner(https_port, http_port, tmp_path / "storage", tmp_path / "reverse-proxy.log")
    with running.log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "reverse-proxy",
                "--from",
                "rp.test",
                "--to",
                f"127.0.0.1:{app.port}",
                "--internal",
                "--https-listen",
                f"127.0.0.1:{https_port}",
                "--http-listen",
                f"127.0.0.1:{http_port}",
                "--storage",
                str(running.storage),
                *extra,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for_port(https_port, process=process)
        except RuntimeError as exc:
            raise AssertionError(running.log_path.read_text()) from exc
        yield running
        assert stop_process(process, signal.SIGTERM) == 0, running.log_path.read_text()
    finally:
        stop_process(process, signal.SIGKILL)


def test_reverse_proxy_one_liner_serves_the_app_over_https(app: UvicornApp, tmp_path: Path) -> None:
    with one_liner(app, tmp_path) as running:
        result = running.curl(f"https://rp.test:{running.https_port}/")
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["message"] == "hello from the example app behind tlsproxy"
        assert seen["scheme"] == "https"
        assert seen["host"] == f"rp.test:{running.https_port}"
    assert f"site rp.test -> http://127.0.0.1:{app.port}" in running.log_path.read_text()


def test_reverse_proxy_on_high_ports_redirects_to_its_own_https_port(
    app: UvicornApp, tmp_path: Path
) -> None:
    """The README's one-liner (8443/8080): curl -L from the HTTP port must land on 8443."""
    with one_liner(app, tmp_path) as running:
        result = running.curl(f"http://rp.test:{running.http_port}/?from=http", "-L")
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["url"] == f"https://rp.test:{running.https_port}/?from=http"


def test_reverse_proxy_https_port_names_the_published_port(app: UvicornApp, tmp_path: Path) -> None:
    """Behind a port mapping (published 443 -> 8443 here) the redirect names the public port."""
    with one_liner(app, tmp_path, "--https-port", "443") as running:
        result = running.curl(f"http://rp.test:{running.http_port}/x", "-o", "/dev/null", "-D", "-")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("HTTP/1.1 308 ")
        assert "\nlocation: https://rp.test/x\n" in result.stdout.lower()


# -- certs --------------------------------------------------------------------------------


def test_certs_lists_the_internal_certificate_after_a_run(app: UvicornApp, tmp_path: Path) -> None:
    proxy = ProxyProcess.start(
        tmp_path, [{"hosts": ["certs.test", "www.certs.test"], "upstreams": [app.url]}]
    )
    try:
        context = proxy.client_context()
        with (
            socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="www.certs.test") as tls,
        ):
            peer = tls.getpeercert()
            assert peer is not None
    finally:
        assert proxy.stop() == 0, proxy.log()
    served_not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(str(peer["notAfter"])), UTC)

    result = tlsproxy("certs", "--config", str(proxy.config_path))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert re.split(r"\s{2,}", header.strip()) == [
        "NAMES",
        "ISSUER",
        "NOT AFTER",
        "NEXT RENEWAL",
        "LAST ERROR",
    ]
    assert len(rows) == 1, result.stdout
    names, issuer, not_after, renewal, error = re.split(r"\s{2,}", rows[0].strip())
    assert names == "certs.test www.certs.test"
    assert issuer == "internal"
    assert datetime.fromisoformat(not_after) == served_not_after
    assert datetime.now(UTC) < datetime.fromisoformat(renewal) < served_not_after
    assert error == "-"


# -- help ---------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = tlsproxy("--help")
    assert result.returncode == 0
    for command in ("run", "reverse-proxy", "check", "certs", "renew"):
        assert re.search(rf"^\s+{re.escape(command)}\b", result.stdout, re.MULTILINE), command
