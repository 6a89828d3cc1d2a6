"""DNS-01 end to end: a real authoritative server (Knot), real Pebble validation, real clients.

Knot serves ``example.test`` on port 53 of its own loopback address
and takes TSIG-signed RFC 2136 updates; Pebble's validator asks it for the TXT records (its
``-dnsserver``); the proxy writes them (``provider = "rfc2136"``, or a user's script with
``provider = "exec"``) and waits until the zone's nameserver serves them. No port-80
listener anywhere: DNS-01 needs none.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.knot import KEY_NAME, Knot, knot_available
from tests.pebble import Pebble, acme_config, pebble_available, served_certificate, start_proxy
from tests.support import ROOT, ProxyProcess, RawUpstream, free_port

pytestmark = pytest.mark.skipif(
    not (pebble_available() and knot_available()), reason="needs pebble, knotd and root"
)

APEX = "apps.example.test"


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    server = Knot(
        tmp_path_factory.mktemp("knot"),
        {
            "example.test": [
                # validation delegated to a name that exists only for it (acme-dns's pattern;
                # in the same zone, as Pebble asks this server directly, not a resolver that
                # would chase a CNAME into another zone)
                "_acme-challenge.alias CNAME alias.validation.example.test.",
            ],
        },
    )
    yield server
    server.stop()


@pytest.fixture
def pebble(tmp_path: Path, knot: Knot) -> Iterator[Pebble]:
    # httpPort points nowhere: only DNS-01 can succeed
    ca = Pebble(tmp_path / "pebble", free_port(), 53, dns_host=knot.address)
    yield ca.start()
    ca.stop()


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    running: list[ProxyProcess] = []
    yield running
    for proxy in running:
        proxy.stop()


def rfc2136(knot: Knot, **options: Any) -> dict[str, Any]:
    """``[acme]`` keys for DNS-01 through RFC 2136 updates to ``knot``."""
    dns = {
        "provider": "rfc2136",
        "server": f"{knot.address}:53",
        "tsig_key": KEY_NAME,
        "tsig_secret": knot.secret,
        "resolvers": [f"{knot.address}:53"],
        "propagation_timeout": 10,
    }
    return {"challenges": ["dns-01"], "dns": dns | options}


def write_config(
    tmp_path: Path, pebble: Pebble, upstream: RawUpstream, hosts: list[str], acme: dict[str, Any]
) -> tuple[Path, int]:
    sites = [{"hosts": hosts, "upstreams": [upstream.url]}]
    return acme_config(tmp_path / "proxy", pebble, sites, server={"http_listen": []}, acme=acme)


def tlsproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


def eventually(attempt: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = attempt()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def serial_for(port: int, host: str, roots: Path) -> int | None:
    """The serial served for ``host`` if it verifies (chain and name) against ``roots``."""
    try:
        return int(str(served_certificate(port, host, roots)["serialNumber"]), 16)
    except OSError:  # ssl.SSLCertVerificationError included
        return None


def test_a_wildcard_certificate_over_rfc2136_is_served_and_its_records_are_removed(
    tmp_path: Path,
    knot: Knot,
    pebble: Pebble,
    upstream: RawUpstream,
    proxies: list[ProxyProcess],
) -> None:
    roots = pebble.write_roots(tmp_path / "roots.pem")
    secret_file = tmp_path / "tsig.secret"
    secret_file.write_text(knot.secret + "\n")
    acme = rfc2136(knot)
    acme["dns"] = {k: v for k, v in acme["dns"].items() if k != "tsig_secret"} | {
        "tsig_secret_file": str(secret_file)
    }
    config, https_port = write_config(tmp_path, pebble, upstream, [APEX, f"*.{APEX}"], acme)
    assert tlsproxy("check", "--config", str(config)).returncode == 0

    started = time.monotonic()
    proxy = start_proxy(config, https_port, free_port())
    proxies.append(proxy)
    first = eventually(lambda: serial_for(https_port, f"x.{APEX}", roots), 30, "wildcard cert")
    print(f"wildcard certificate served {time.monotonic() - started:.2f} s after start")
    assert serial_for(https_port, f"other.{APEX}", roots) == first  # any one label
    assert serial_for(https_port, APEX, roots) == first  # and the apex, same certificate
    assert serial_for(https_port, f"a.b.{APEX}", roots) is None  # a wildcard is one label

    # the apex and the wildcard each had a TXT value at the same name; both are gone
    assert knot.txt(f"_acme-challenge.{APEX}.") == []
    log = proxy.log()
    assert len(re.findall(rf"TXT record _acme-challenge\.{APEX}\. added", log)) == 2
    assert len(re.findall(rf"TXT record _acme-challenge\.{APEX}\. removed", log)) == 2
    assert re.search(rf"_acme-challenge\.{APEX}\. served by ns1\.example\.test\. after", log)
    assert knot.secret not in log
    assert pebble.orders() == 1

    ((names, issuer, not_after, _renewal, error),) = [
        re.split(r"\s{2,}", line.strip())
        for line in tlsproxy("certs", "--config", str(config)).stdout.splitlines()[1:]
    ]
    assert names == f"{APEX} *.{APEX}"
    assert issuer == f"acme:127.0.0.1:{pebble.port}"
    assert not_after != "-" and error == "-"


def test_a_wrong_tsig_secret_is_a_clear_error_and_the_old_certificate_keeps_serving(
    tmp_path: Path,
    knot: Knot,
    pebble: Pebble,
    upstream: RawUpstream,
    proxies: list[ProxyProcess],
) -> None:
    roots = pebble.write_roots(tmp_path / "roots.pem")
    config, https_port = write_config(tmp_path, pebble, upstream, [f"*.{APEX}"], rfc2136(knot))
    result = tlsproxy("renew", "--config", str(config))  # no proxy running: DNS-01 needs none
    assert result.returncode == 0, result.stderr
    proxy = start_proxy(config, https_port, free_port())
    proxies.append(proxy)
    first = serial_for(https_port, f"w.{APEX}", roots)
    assert first is not None  # served from storage at once

    wrong = "d3JvbmctYnV0LXdlbGwtZm9ybWVkLXNlY3JldA=="
    broken = tmp_path / "broken.toml"
    broken.write_text(config.read_text().replace(knot.secret, wrong))
    result = tlsproxy("renew", "--config", str(broken), "--force")
    assert result.returncode == 1
    assert f"rejected the signature of TSIG key '{KEY_NAME}' (BADSIG)" in result.stderr
    assert "check tsig_secret and tsig_algorithm" in result.stderr
    assert wrong not in result.stderr + result.stdout
    assert knot.txt(f"_acme-challenge.{APEX}.") == []  # nothing was written

    assert serial_for(https_port, f"w.{APEX}", roots) == first  # still serving
    certs = tlsproxy("certs", "--config", str(config)).stdout
    assert "BADSIG" in certs and wrong not in certs and knot.secret not in certs
    assert pebble.orders() == 2  # the forced order was placed, and failed at our DNS step


def hook_script(tmp_path: Path, knot: Knot, zone: str, present: bool = True) -> Path:
    """The docs' exec hook: knsupdate with the TSIG key; each call appended to calls.log."""
    script = tmp_path / "acme-dns-hook"
    update = 'update $op $2 60 TXT "$3"' if present else ""
    script.write_text(
        f"""#!/bin/sh
set -e
echo "$@" >> {tmp_path}/calls.log
case "$1" in present) op=add ;; cleanup) op=del ;; *) exit 2 ;; esac
knsupdate -y "hmac-sha256:{KEY_NAME}:{knot.secret}" <<END
server {knot.address} 53
zone {zone}.
{update}
send
END
"""
    )
    script.chmod(0o700)
    return script


def test_exec_provider_follows_a_cname_to_the_validation_name(
    tmp_path: Path, knot: Knot, pebble: Pebble, upstream: RawUpstream
) -> None:
    script = hook_script(tmp_path, knot, "example.test")
    acme = {
        "challenges": ["dns-01"],
        "dns": {
            "provider": "exec",
            "command": [str(script)],
            "resolvers": [f"{knot.address}:53"],
            "propagation_timeout": 10,
        },
    }
    config, _ = write_config(tmp_path, pebble, upstream, ["alias.example.test"], acme)
    result = tlsproxy("renew", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "alias.example.test: new certificate" in result.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [call.split()[:2] for call in calls] == [
        ["present", "alias.validation.example.test."],
        ["cleanup", "alias.validation.example.test."],
    ]
    assert knot.txt("alias.validation.example.test.") == []


def test_a_record_that_never_appears_fails_after_the_propagation_timeout(
    tmp_path: Path, knot: Knot, pebble: Pebble, upstream: RawUpstream
) -> None:
    script = hook_script(tmp_path, knot, "example.test", present=False)  # says yes, adds nothing
    acme = {
        "challenges": ["dns-01"],
        "dns": {
            "provider": "exec",
            "command": [str(script)],
            "resolvers": [f"{knot.address}:53"],
            "propagation_timeout": 1,
        },
    }
    config, _ = write_config(tmp_path, pebble, upstream, ["late.example.test"], acme)
    started = time.monotonic()
    result = tlsproxy("renew", "--config", str(config))
    assert result.returncode == 1
    assert (
        "the TXT record _acme-challenge.late.example.test. was not served by "
        "ns1.example.test. within 1 s (propagation_timeout)"
    ) in result.stderr
    assert time.monotonic() - started < 15
    assert pebble.orders() == 1
    assert "POST /chalZ/" not in pebble.log()  # never answered: the CA did not look too early
