"""The ACME account: one EC P-256 key per CA, created once in storage, registered per process.

Registering with a key the CA already knows returns the existing account (RFC 8555 7.3.1;
``ConflictError`` in the library), so each process simply registers once when it first needs
the account. That also recovers when a CA has forgotten the account (a test CA restarted).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from acme import client, errors, messages
from josepy.jwk import JWKEC

from acme_client.keys import load_account_key, new_key_pem
from acme_client.network import Network, failure
from acme_client.records import ca_id
from acme_client.storage import Storage

log = logging.getLogger("tlsproxy.acme")

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
ACCOUNT_LOCK_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ACMESettings:
    """How to reach the CA and who we are there (the ``[acme]`` table)."""

    directory: str = LETS_ENCRYPT
    email: str = ""
    ca_bundle: str = ""  # a CA file for the CA's HTTPS API (private CAs, Pebble)
    eab_kid: str = ""  # External Account Binding, for CAs that require one
    eab_hmac_key: str = ""  # base64url, as the CA hands it out
    http_timeout: float = 15.0  # seconds per HTTP request to the CA


class Account:
    """The account key in storage and its registration (thread-safe, once per process)."""

    def __init__(self, settings: ACMESettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.ca = ca_id(settings.directory)
        self.prefix = f"acme/{self.ca}/account"
        self._key: JWKEC | None = None
        self._uri: str | None = None
        self._lock = threading.Lock()

    def key(self) -> JWKEC:
        """Load the key, creating it (0600) on first use; every process ends up with the same."""
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create_key()
            return self._key

    def _load_or_create_key(self) -> JWKEC:
        path = f"{self.prefix}/key.pem"
        pem = self.storage.load(path)
        if pem is None:
            with self.storage.lock(f"acme-{self.ca}-account", ACCOUNT_LOCK_TIMEOUT):
                pem = self.storage.load(path)  # another process may have just created it
                if pem is None:
                    pem = new_key_pem()
                    self.storage.store(path, pem, private=True)
                    log.info("created ACME account key %s", self.storage.describe(path))
        return load_account_key(pem)

    def connect(self) -> client.ClientV2:
        """A fresh client (one per flow: the library is not thread-safe) with the account set.

        Raises :class:`~acme_client.network.ACMEFailure`.
        """
        verify: str | bool = self.settings.ca_bundle or True
        key = self.key()
        net = Network(key, verify=verify, timeout=self.settings.http_timeout)
        try:
            directory = client.ClientV2.get_directory(self.settings.directory, net)
            acme = client.ClientV2(directory, net)
            uri = self._registered(acme, key)
        except Exception as exc:
            net.session.close()
            raise failure(exc, net) from exc
        net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        return acme

    def forget(self) -> None:
        """The CA said the account does not exist: register again on the next connect."""
        with self._lock:
            self._uri = None

    def _registered(self, acme: client.ClientV2, key: JWKEC) -> str:
        with self._lock:
            if self._uri is None:
                self._uri = self._register(acme, key)
            return self._uri

    def _register(self, acme: client.ClientV2, key: JWKEC) -> str:
        settings = self.settings
        eab = None
        if settings.eab_kid:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(),  # never the private JWK
                kid=settings.eab_kid,
                hmac_key=settings.eab_hmac_key,
                directory=acme.directory,
            )
        registration = messages.NewRegistration.from_data(
            email=settings.email or None,
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
        try:
            uri = str(acme.new_account(registration).uri)
            created = True
        except errors.ConflictError as exc:
            uri, created = exc.location, False
        acme.net.account = None  # connect() sets the bare resource for every client alike
        record = {
            "uri": uri,
            "directory": settings.directory,
            "email": settings.email,
            "registered": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.storage.store(f"{self.prefix}/account.json", json.dumps(record, indent=2).encode())
        log.info(
            "ACME account %s at %s (%s)",
            uri,
            settings.directory,
            "registered, terms of service agreed" if created else "existing",
        )
        return uri
