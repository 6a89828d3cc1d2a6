"""The ``tlsproxy`` command as a user runs it: ``python -m proxy ...`` in a real subprocess."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

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


def test_run_with_unreadable_certificate_files_fails_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    sites = [
        {
            "hosts": ["a.test"],
            "upstreams": ["http://127.0.0.1:8000"],
            "cert": str(missing / "fullchain.pem"),
            "key": str(missing / "privkey.pem"),
        }
    ]
    config, port = write_config(tmp_path / "files.toml", sites)
    result = tlsproxy("run", "--config", str(config))
    assert result.returncode != 0
    assert refuses(port)
    assert "a.test" in result.stderr and str(missing / "fullchain.pem") in result.stderr
    assert "Traceback" not in result.stderr, (
        "run with a missing cert file dies with a Python traceback instead of one error line "
        "(CertificateError escapes proxy/cli.py _serve(), which only catches OSError)\n"
        + result.stderr
    )


# -- reverse-proxy ------------------------------------------------------------------------


def test_reverse_proxy_one_liner_serves_the_app_over_https(app: UvicornApp, tmp_path: Path) -> None:
    https_port, http_port = free_port(), free_port()
    storage = tmp_path / "storage"
    log_path = tmp_path / "reverse-proxy.log"
    with log_path.open("wb") as log:
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
                str(storage),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for_port(https_port, process=process)
        except RuntimeError as exc:
            raise AssertionError(log_path.read_text()) from exc
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(storage / "ca" / "root.pem"),
                "--resolve",
                f"rp.test:{https_port}:127.0.0.1",
                f"https://rp.test:{https_port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen["message"] == "hello from the example app behind tlsproxy"
        assert seen["scheme"] == "https"
        assert seen["host"] == f"rp.test:{https_port}"
        assert stop_process(process, signal.SIGTERM) == 0, log_path.read_text()
    finally:
        stop_process(process, signal.SIGKILL)
    assert f"site rp.test -> http://127.0.0.1:{app.port}" in log_path.read_text()


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
