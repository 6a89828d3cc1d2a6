"""The TLS policy, proven by an independent scanner: sslyze must find a running proxy (with
its internal CA) compliant with Mozilla's "intermediate" configuration.

sslyze pins ``cryptography<47`` while tlsproxy runs on any recent one, so it is not a test
dependency: this test installs it once into its own virtualenv under the user's cache
directory (``$XDG_CACHE_HOME`` or ``~/.cache``, ``tlsproxy-tests/``; outside the repository)
and runs it as a command. ``TLSPROXY_SSLYZE`` may name an sslyze command to use instead. If
the install fails (no package index reachable) the test is skipped, saying why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ProxyProcess, RawUpstream

SSLYZE = "sslyze==6.3.1"  # the version whose "intermediate" checks we have read
PINS = Path(__file__).with_name("constraints-sslyze.txt")  # its dependencies, pinned


def cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tlsproxy-tests"


def sslyze_command() -> list[str]:
    """The sslyze command line, installing sslyze into its own virtualenv the first time."""
    if command := os.environ.get("TLSPROXY_SSLYZE"):
        return shlex.split(command)
    cache = cache_directory()
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    pins = hashlib.sha256(PINS.read_bytes()).hexdigest()[:12]  # new pins: a new environment
    environment = cache / f"sslyze-{tag}-{pins}"
    python = environment / "bin" / "python"
    ready = environment / ".installed"
    with (cache / "sslyze.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        if not ready.exists():
            venv.EnvBuilder(clear=True, with_pip=True).create(environment)
            install = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "-c", str(PINS), SSLYZE],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if install.returncode != 0:
                pytest.skip(f"could not install {SSLYZE}: {install.stderr.strip()[-500:]}")
            ready.touch()
    return [str(python), "-m", "sslyze"]


@pytest.fixture(scope="module")
def sslyze() -> list[str]:
    return sslyze_command()


@pytest.fixture(params=["uvloop", "asyncio"])
def proxy(
    request: pytest.FixtureRequest, upstream: RawUpstream, tmp_path: Path
) -> Iterator[ProxyProcess]:
    sites: list[dict[str, object]] = [{"hosts": ["proxy.test"], "upstreams": [upstream.url]}]
    running = ProxyProcess.start(tmp_path, sites, server={"loop": request.param})
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


@pytest.mark.timeout(900)  # the first run installs sslyze
def test_sslyze_finds_mozilla_intermediate_compliance(
    sslyze: list[str], proxy: ProxyProcess, tmp_path: Path
) -> None:
    report = tmp_path / "sslyze.json"
    scan = subprocess.run(
        [
            *sslyze,
            f"proxy.test:{proxy.https_port}{{127.0.0.1}}",  # SNI proxy.test, dial loopback
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={proxy.root_ca}",
            f"--json_out={report}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert scan.returncode == 0, scan.stdout[-4000:] + scan.stderr[-2000:]
    assert "OK - Compliant." in scan.stdout

    result = json.loads(report.read_text())["server_scan_results"][0]["scan_result"]

    def accepted(plugin: str) -> list[str]:
        suites = result[plugin]["result"]["accepted_cipher_suites"]
        return [suite["cipher_suite"]["name"] for suite in suites]

    for old in ["ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"]:
        assert accepted(f"{old}_cipher_suites") == [], old
    assert accepted("tls_1_2_cipher_suites") and accepted("tls_1_3_cipher_suites")
    curves = result["elliptic_curves"]["result"]["supported_curves"]
    assert sorted(c["name"] for c in curves) == ["X25519", "secp256r1", "secp384r1"]
    deployment = result["certificate_info"]["result"]["certificate_deployments"][0]
    trusted = {
        v["trust_store"]["name"]: v["was_validation_successful"]
        for v in deployment["path_validation_results"]
    }
    assert trusted["Supplied CA file"] is True  # the chain validates up to our own root
    assert deployment["received_chain_contains_anchor_certificate"] is False  # no root sent
