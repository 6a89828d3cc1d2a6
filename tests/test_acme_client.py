"""``acme_client`` on its own against a real Pebble: accounts, EAB, badNonce, the storage lock.

HTTP-01 is answered by a tiny threaded HTTP server reading the same challenge store the
issuer writes (the proxy's port-80 listener does this in the end-to-end tests).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from acme_client.account import ACMESettings
from acme_client.challenges import StorageChallengeStore
from acme_client.interfaces import ChallengeStore
from acme_client.renewer import CertificateRequest, Outcome, Renewer
from acme_client.solvers import HTTP01Solver
from acme_client.storage import FileStorage
from tests.pebble import LoopbackDNS, Pebble, pebble_available
from tests.support import ROOT

needs_pebble = pytest.mark.skipif(not pebble_available(), reason="pebble is not installed")


def test_acme_client_never_imports_proxy() -> None:
    code = (
        "import sys, pkgutil, importlib, acme_client\n"
        "for m in pkgutil.iter_modules(acme_client.__path__):\n"
        "    importlib.import_module('acme_client.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'proxy' or n.startswith('proxy.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    for source in (ROOT / "acme_client").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "proxy" or n.startswith("proxy.") for n in names), source


class Responder:
    """Port 80 for Pebble: answers /.well-known/acme-challenge/<token> from a store."""

    def __init__(self, store: ChallengeStore) -> None:
        outer = self
        self.store = store
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                answer = outer.store.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if answer else 404)
                self.end_headers()
                self.wfile.write((answer or "").encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "data")


@pytest.fixture
def responder(storage: FileStorage) -> Iterator[Responder]:
    server = Responder(StorageChallengeStore(storage))
    yield server
    server.close()


@pytest.fixture
def pebbles(
    tmp_path: Path, dns: LoopbackDNS, responder: Responder
) -> Iterator[Callable[..., Pebble]]:
    started: list[Pebble] = []

    def make(**options: Any) -> Pebble:
        where = tmp_path / f"pebble{len(started)}"
        pebble = Pebble(where, responder.port, dns.port, **options)
        started.append(pebble)
        return pebble.start()

    yield make
    for pebble in started:
        pebble.stop()


def renewer_for(pebble: Pebble, storage: FileStorage, **settings: Any) -> Renewer:
    acme = ACMESettings(directory=pebble.url, ca_bundle=str(pebble.api_ca), **settings)
    return Renewer(acme, storage, [HTTP01Solver(StorageChallengeStore(storage))])


@needs_pebble
def test_account_key_is_created_once_and_the_account_reused(
    pebbles: Callable[..., Pebble], storage: FileStorage
) -> None:
    pebble = pebbles()
    request = CertificateRequest("a.test", ("a.test", "b.a.test"))
    first = renewer_for(pebble, storage, email="ops@a.test").renew(request)
    assert first.status == "issued", first.error
    assert first.certificate is not None
    assert first.certificate.info.names == {"a.test", "b.a.test"}
    account_key = storage.path(f"acme/127.0.0.1-{pebble.port}-dir/account/key.pem")
    assert account_key.stat().st_mode & 0o777 == 0o600
    key_pem = account_key.read_bytes()
    account = json.loads(account_key.with_name("account.json").read_text())

    # another "process" on the same storage: same key, same account, nothing ordered
    again = renewer_for(pebble, storage, email="ops@a.test")
    assert again.renew(request).status == "fresh"
    outcome = again.renew(request, force=True)
    assert outcome.status == "issued", outcome.error
    assert account_key.read_bytes() == key_pem
    assert json.loads(account_key.with_name("account.json").read_text())["uri"] == account["uri"]
    assert "There are now 1 accounts" in pebble.log()
    assert "There are now 2 accounts" not in pebble.log()
    assert pebble.orders() == 2
    assert list(storage.path("acme/challenges").iterdir()) == []  # tokens cleaned up


@needs_pebble
def test_bad_nonces_are_retried_more_than_once(
    pebbles: Callable[..., Pebble], storage: FileStorage
) -> None:
    pebble = pebbles(nonce_reject=30)
    issuer = renewer_for(pebble, storage).issuer
    retried = 0
    for index in range(4):
        issued = issuer.obtain([f"n{index}.test", f"www.n{index}.test"])
        retried += issued.bad_nonces
    assert "Configured to reject 30% of good nonces" in pebble.log()
    assert retried >= 3  # ~3.5 per issuance expected; the library alone retries once


@needs_pebble
def test_only_one_of_two_processes_orders_and_the_other_adopts_its_certificate(
    pebbles: Callable[..., Pebble], storage: FileStorage
) -> None:
    pebble = pebbles()
    request = CertificateRequest("lock.test", ("lock.test",))
    results: list[Outcome] = []
    barrier = threading.Barrier(2)

    def process() -> None:
        renewer = renewer_for(pebble, storage)  # its own account object, like a process
        barrier.wait()
        results.append(renewer.renew(request, lock_timeout=30))

    threads = [threading.Thread(target=process) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(o.status for o in results) == ["fresh", "issued"]
    serials = {o.certificate.info.serial for o in results if o.certificate is not None}
    assert len(serials) == 1
    assert pebble.orders() == 1


@needs_pebble
def test_external_account_binding(pebbles: Callable[..., Pebble], storage: FileStorage) -> None:
    hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    pebble = pebbles(eab_keys={"kid-1": hmac})
    request = CertificateRequest("eab.test", ("eab.test",))

    refused = renewer_for(pebble, storage).renew(request)
    assert refused.status == "failed"
    assert refused.error is not None
    assert refused.error.kind == "urn:ietf:params:acme:error:externalAccountRequired"

    bound = renewer_for(pebble, storage, eab_kid="kid-1", eab_hmac_key=hmac)
    outcome = bound.renew(request, respect_backoff=False)
    assert outcome.status == "issued", outcome.error


@needs_pebble
def test_a_wrong_key_authorization_is_the_cas_unauthorized_error(
    pebbles: Callable[..., Pebble], storage: FileStorage, responder: Responder
) -> None:
    pebble = pebbles()

    class Wrong:
        def get(self, token: str) -> str | None:
            return "wrong" if token else None

    responder.store = Wrong()  # type: ignore[assignment]
    outcome = renewer_for(pebble, storage).renew(CertificateRequest("w.test", ("w.test",)))
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.kind == "urn:ietf:params:acme:error:unauthorized"
    assert "w.test" in outcome.error.detail
    assert responder.requests >= 1
    directory = storage.path(f"acme/127.0.0.1-{pebble.port}-dir/certificates/w.test")
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["failures"] == 1
    assert "unauthorized" in meta["last_error"]
    assert meta["next_attempt"] is not None
