"""HTTP-01 key authorizations kept in storage, so any process sharing it can answer them.

The issuer of one process (say ``tlsproxy renew``) writes a token; the port-80 listener of
another (the running proxy) answers the CA's request for it. ``get`` is one small file read.
"""

from __future__ import annotations

from acme_client.interfaces import is_valid_token
from acme_client.storage import Storage

CHALLENGES = "acme/challenges"


class StorageChallengeStore:
    """A :class:`~acme_client.interfaces.ChallengeStore` backed by :class:`Storage`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def put(self, token: str, key_authorization: str) -> None:
        self.storage.store(_key(token), key_authorization.encode("ascii"))

    def get(self, token: str) -> str | None:
        if not is_valid_token(token):
            return None
        data = self.storage.load(f"{CHALLENGES}/{token}")
        return None if data is None else data.decode("ascii", "replace")

    def delete(self, token: str) -> None:
        self.storage.delete(_key(token))


def _key(token: str) -> str:
    if not is_valid_token(token):
        raise ValueError(f"invalid ACME token {token!r}")
    return f"{CHALLENGES}/{token}"
