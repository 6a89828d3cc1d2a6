"""``acme_client`` without a CA: schedule arithmetic, storage, metadata, renewals.

The loop tests drive the proxy's one maintenance loop (:mod:`proxy.certs.manager`) over an
ACME source whose renewer has a fake issuer that signs short-lived leaves with a local CA, so
renewal, backoff, storage polling and ARI are exercised in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import stat
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from acme_client.account import Account, ACMESettings
from acme_client.challenges import StorageChallengeStore
from acme_client.interfaces import MemoryChallengeStore
from acme_client.issuer import Issued, Issuer
from acme_client.keys import new_key_pem
from acme_client.network import ACMEFailure, parse_retry_after
from acme_client.records import CertificateRecords, Metadata, ca_id
from acme_client.renewer import CertificateRequest, Renewer, due_time
from acme_client.schedule import next_attempt, renewal_due, retry_bounds, retry_delay
from acme_client.storage import FileStorage, LockBusy, check_key
from proxy.certs.acme_sites import ACMESource, Issuance
from proxy.certs.manager import CertificateManager
from proxy.certs.store import CertEntry, CertStore
from proxy.config import ACMEConfig, TLSConfig
from proxy.tasks import spawn

NOW = datetime(2030, 1, 1, tzinfo=UTC)
DIRECTORY = "https://ca.test/acme/directory"

# -- schedule ------------------------------------------------------------------------------


def test_renewal_is_due_when_a_third_of_the_lifetime_remains() -> None:
    assert renewal_due(NOW, NOW + timedelta(seconds=90)) == NOW + timedelta(seconds=60)
    ninety_days = renewal_due(NOW, NOW + timedelta(days=90))
    assert ninety_days == NOW + timedelta(days=60)
    assert renewal_due(NOW, NOW + timedelta(days=6)) == NOW + timedelta(days=4)


def test_the_cas_ari_window_wins_but_never_after_expiry() -> None:
    ari = NOW + timedelta(days=10)
    assert renewal_due(NOW, NOW + timedelta(days=90), ari) == ari
    late = NOW + timedelta(days=100)
    assert renewal_due(NOW, NOW + timedelta(days=90), late) == NOW + timedelta(days=90)


def test_retry_bounds_scale_with_the_lifetime() -> None:
    assert retry_bounds(None) == (timedelta(minutes=1), timedelta(hours=1))
    assert retry_bounds(timedelta(days=90)) == (timedelta(minutes=1), timedelta(hours=1))
    low, high = retry_bounds(timedelta(seconds=90))
    assert low == timedelta(seconds=1.5)
    assert high == timedelta(seconds=15)
    assert retry_bounds(timedelta(seconds=3)) == (timedelta(seconds=1), timedelta(seconds=1))


def test_retry_delay_doubles_with_jitter_up_to_the_bound() -> None:
    rng = random.Random(7)
    delays = [retry_delay(n, None, rng).total_seconds() for n in range(1, 12)]
    assert 48 <= delays[0] <= 72
    assert 96 <= delays[1] <= 144
    assert all(2880 <= d <= 4320 for d in delays[7:])  # capped at 1 h +- 20 %
    assert len({round(d) for d in delays[7:]}) > 1  # jittered, not lock-step


def test_next_attempt_honours_retry_after_but_always_tries_before_expiry() -> None:
    rng = random.Random(1)
    expiry = NOW + timedelta(minutes=30)
    assert next_attempt(NOW, 1, not_after=expiry, rng=rng) < NOW + timedelta(minutes=2)
    rate_limited = NOW + timedelta(minutes=10)
    assert next_attempt(NOW, 1, not_after=expiry, retry_after=rate_limited) == rate_limited
    # a backoff (or Retry-After) beyond expiry moves to half-way between now and expiry
    assert next_attempt(NOW, 20, not_after=expiry, rng=rng) == NOW + timedelta(minutes=15)
    too_late = NOW + timedelta(hours=2)
    assert next_attempt(NOW, 1, not_after=expiry, retry_after=too_late) == NOW + timedelta(
        minutes=15
    )
    # an expired (or absent) certificate: plain backoff
    assert next_attempt(NOW, 1, not_after=NOW - timedelta(1), rng=rng) > NOW


def test_retry_after_header_in_both_forms() -> None:
    assert parse_retry_after("120", NOW) == NOW + timedelta(seconds=120)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == datetime(
        2015, 10, 21, 7, 28, tzinfo=UTC
    )
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# -- storage -------------------------------------------------------------------------------


def test_file_storage_writes_private_values_owner_only_and_atomically(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    storage.store("acme/ca/account/key.pem", b"secret", private=True)
    storage.store("acme/ca/account/account.json", b"{}")
    path = storage.path("acme/ca/account/key.pem")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("account.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    before = storage.version("acme/ca/account/key.pem")
    storage.store("acme/ca/account/key.pem", b"secret2", private=True)
    assert storage.version("acme/ca/account/key.pem") != before
    assert storage.load("acme/ca/account/key.pem") == b"secret2"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    storage.delete("acme/ca/account/key.pem")
    assert storage.load("acme/ca/account/key.pem") is None
    assert storage.version("acme/ca/account/key.pem") is None


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/./b", ".hidden"])
def test_storage_keys_cannot_escape(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


def test_storage_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with storage.lock("x"):
        with pytest.raises(LockBusy), storage.lock("x", timeout=0.1):
            pass
        with storage.lock("y"):
            pass
    with storage.lock("x"):
        pass


def test_challenge_tokens_in_storage_are_shared(tmp_path: Path) -> None:
    writer = StorageChallengeStore(FileStorage(tmp_path))
    reader = StorageChallengeStore(FileStorage(tmp_path))  # another process
    token = "A" * 43
    writer.put(token, f"{token}.thumbprint")
    assert reader.get(token) == f"{token}.thumbprint"
    assert reader.get("../../etc/passwd") is None
    assert reader.get("short") is None
    with pytest.raises(ValueError):
        writer.put("../x" * 10, "k")
    writer.delete(token)
    assert reader.get(token) is None


# -- records -------------------------------------------------------------------------------


def test_ca_ids() -> None:
    letsencrypt = "https://acme-v02.api.letsencrypt.org/directory"
    assert ca_id(letsencrypt) == "acme-v02.api.letsencrypt.org-directory"
    assert ca_id("https://127.0.0.1:14000/dir") == "127.0.0.1-14000-dir"
    assert ca_id("https://[::1]:14000/dir") == "__1-14000-dir"


def test_metadata_round_trips_and_keeps_unknown_keys() -> None:
    meta = Metadata(
        ("a.test", "b.test"),
        DIRECTORY,
        serial="AB",
        not_before=NOW,
        not_after=NOW + timedelta(days=90),
        last_error="urn:ietf:params:acme:error:connection: boom",
        failures=2,
        next_attempt=NOW + timedelta(minutes=2),
        extra={"future": 1},
    )
    assert Metadata.from_json(meta.to_json()) == meta
    with pytest.raises(ValueError):
        Metadata.from_json(b"[]")


# -- a local CA standing in for the ACME server --------------------------------------------


class LocalCA:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Intermediate")])
        self.name = name

    def issue(self, names: Sequence[str], seconds: float) -> tuple[bytes, bytes]:
        key_pem = new_key_pem()
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        now = datetime.now(UTC).replace(microsecond=0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(seconds=seconds))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


class FakeIssuer(Issuer):
    """Issues ``lifetime``-second leaves; fails the calls whose numbers are in ``fail``."""

    def __init__(self, storage: FileStorage, lifetime: float, fail: set[int] | None = None):
        super().__init__(Account(ACMESettings(DIRECTORY), storage), [])
        self.ca = LocalCA()
        self.lifetime = lifetime
        self.fail = fail or set()
        self.calls = 0
        self.window: tuple[datetime, datetime] | None = None

    def obtain(self, names: Sequence[str], cancel: threading.Event | None = None) -> Issued:
        self.calls += 1
        if self.calls in self.fail:
            raise ACMEFailure("urn:ietf:params:acme:error:serverInternal", "try later")
        chain, key = self.ca.issue(names, self.lifetime)
        return Issued(chain, key, "https://ca.test/order/1", 0.0, 0)

    def renewal_window(
        self, chain_pem: bytes, directory: str = ""
    ) -> tuple[datetime, datetime] | None:
        return self.window


class RecordingStore(CertStore):
    """A certificate store that also lists the serial of every certificate installed."""

    def __init__(self) -> None:
        super().__init__()
        self.serials: list[str] = []

    def install_entry(self, entry: CertEntry) -> CertEntry:
        self.serials.append(entry.serial)
        return super().install_entry(entry)


def acme_source(
    storage: str, renewer: Renewer, names: tuple[str, ...], on_change: Callable[[], None] | None
) -> ACMESource:
    """An ACME source (no temporary stand-in) whose renewer is ``renewer``."""
    issuance = Issuance(
        TLSConfig(storage=storage),
        ACMEConfig(directory=DIRECTORY),
        MemoryChallengeStore(),
        http_listen=True,
        on_change=on_change,
        renewer=renewer,
    )
    return ACMESource(names, issuance, None)


@contextlib.asynccontextmanager
async def maintained(
    storage: str,
    renewer: Renewer,
    names: tuple[str, ...],
    poll_interval: float = 2.0,
    watch: bool = False,
) -> AsyncIterator[RecordingStore]:
    """The maintenance loop running over one ACME certificate; yields its store."""
    store = RecordingStore()
    manager = CertificateManager(store, poll_interval=poll_interval)
    source = acme_source(storage, renewer, names, manager.look_soon if watch else None)
    await manager.update(add=[source])
    task = spawn(manager.run(), name="certificate maintenance")
    try:
        yield store
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        source.issuance.close()


async def wait_for(predicate: Callable[[], bool], within: float) -> None:
    """Poll ``predicate`` (the loop has no event to await from outside)."""
    for _ in range(int(within / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"condition not met within {within} s")


async def test_the_loop_issues_renews_on_time_retries_a_failure_and_serves_each(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path)
    issuer = FakeIssuer(storage, lifetime=6, fail={2})  # the first renewal attempt fails
    outcomes: list[bool] = []  # what the proxy turns into tlsproxy_acme_renewals_total
    renewer = Renewer(
        ACMESettings(DIRECTORY), storage, [], issuer=issuer, on_outcome=outcomes.append
    )
    renewer.ari = False
    async with maintained(str(tmp_path), renewer, ("s.test",)) as store:
        await wait_for(lambda: len(store.serials) == 1, 3)
        records = CertificateRecords(storage, DIRECTORY)
        meta, first = records.load("s.test")
        assert first is not None
        due = due_time(first)  # 4 s after issuance
        await wait_for(lambda: issuer.calls == 2, 6)
        assert abs((datetime.now(UTC) - due).total_seconds()) < 1.1

        def failed_once() -> bool:
            meta = records.meta("s.test")
            return meta is not None and meta.failures == 1

        await wait_for(failed_once, 3)  # the failure is written just after the attempt
        meta = records.meta("s.test")
        assert meta is not None and meta.failures == 1
        assert meta.last_error is not None and "serverInternal" in meta.last_error
        assert meta.next_attempt is not None and meta.next_attempt < first.info.not_after
        await wait_for(lambda: len(store.serials) == 2, 3)  # the retry, before expiry
        assert datetime.now(UTC) < first.info.not_after
        meta = records.meta("s.test")
        assert meta is not None and (meta.failures, meta.last_error) == (0, None)
        assert outcomes == [True, False, True]
        entry = store.get("s.test")
        assert entry is not None and entry.serial == store.serials[-1]


async def test_a_running_proxy_serves_what_another_process_stored(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    running = Renewer(ACMESettings(DIRECTORY), storage, [], issuer=FakeIssuer(storage, 3600))
    running.ari = False
    request = CertificateRequest("p.test", ("p.test",))
    async with maintained(str(tmp_path), running, request.names, poll_interval=0.2) as store:
        await wait_for(lambda: len(store.serials) == 1, 3)
        other = Renewer(ACMESettings(DIRECTORY), storage, [], issuer=FakeIssuer(storage, 3600))
        outcome = await asyncio.to_thread(other.renew, request, force=True)
        assert outcome.certificate is not None
        await wait_for(lambda: len(store.serials) == 2, 2)
        assert store.serials[-1] == outcome.certificate.info.serial


def test_ari_window_from_the_ca_sets_the_due_time(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    issuer = FakeIssuer(storage, lifetime=90 * 86400)
    renewer = Renewer(ACMESettings(DIRECTORY), storage, [], issuer=issuer)
    request = CertificateRequest("ari.test", ("ari.test",))
    outcome = renewer.renew(request)
    assert outcome.certificate is not None
    lifetime_due = due_time(outcome.certificate)

    suggested = datetime.now(UTC).replace(microsecond=0) + timedelta(days=20)
    issuer.window = (suggested, datetime.now(UTC) + timedelta(hours=6))
    next_check = renewer.check_renewal_info(request)
    assert renewer.ari is True
    assert next_check > datetime.now(UTC)
    stored = renewer.stored(request)
    assert stored is not None
    assert stored.meta.ari_renew_at == suggested
    assert due_time(stored) == suggested != lifetime_due

    issuer.window = None  # a CA without renewalInfo: the lifetime rule, no more ARI checks
    renewer.check_renewal_info(request)
    assert renewer.ari is False


def test_a_half_written_certificate_is_not_used(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    renewer = Renewer(
        ACMESettings(DIRECTORY),
        storage,
        [],
        issuer=FakeIssuer(storage, lifetime=3600),
    )
    request = CertificateRequest("h.test", ("h.test",))
    assert renewer.renew(request).status == "issued"
    records = renewer.records
    # a writer that has replaced the key but not yet the chain and the metadata
    storage.store(records.key("h.test", "key.pem"), new_key_pem(), private=True)
    assert renewer.stored(request) is None
    with contextlib.suppress(LockBusy), records.lock("h.test"):
        pass


def test_rate_limited_errors_carry_the_cas_retry_after(tmp_path: Path) -> None:
    import requests
    from acme import messages
    from josepy.jwk import JWKEC

    from acme_client.network import Network, failure

    net = Network(JWKEC(key=ec.generate_private_key(ec.SECP256R1())), verify=True, timeout=5)
    response = requests.Response()
    response.headers["Retry-After"] = "600"
    net._remember_retry_after(response)  # what the session hook does for every response
    error = messages.Error.with_code("rateLimited", detail="too many certificates")
    found = failure(error, net)
    assert found.kind == "urn:ietf:params:acme:error:rateLimited"
    assert found.detail == "too many certificates"
    assert found.retry_after is not None
    assert 590 < (found.retry_after - datetime.now(UTC)).total_seconds() <= 600

    # the renewer waits until then, since the current certificate outlives it
    storage = FileStorage(tmp_path)
    issuer = FakeIssuer(storage, lifetime=3600)
    renewer = Renewer(ACMESettings(DIRECTORY), storage, [], issuer=issuer)
    request = CertificateRequest("r.test", ("r.test",))
    assert renewer.renew(request).status == "issued"

    def rate_limited(names: Sequence[str], cancel: threading.Event | None = None) -> Issued:
        raise found

    issuer.obtain = rate_limited  # type: ignore[method-assign]
    outcome = renewer.renew(request, force=True)
    assert outcome.status == "failed"
    assert outcome.meta is not None and outcome.meta.next_attempt == found.retry_after
    assert renewer.renew(request).status == "fresh"


def test_dns01_txt_value_and_record_name_agree_with_the_acme_library() -> None:
    from acme import challenges
    from josepy.jwk import JWKEC

    from acme_client.dns01 import record_name, txt_value

    key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    chall = challenges.DNS01(token=b"0123456789abcdef0123456789abcdef")
    assert txt_value(chall.key_authorization(key)) == chall.validation(key)
    assert record_name("*.Apps.Example.test.") == "_acme-challenge.apps.example.test."
    assert record_name("a.test") == chall.validation_domain_name("a.test") + "."
