"""The names that got a certificate on demand, kept in storage so that every process (and
the next start) knows them: a restart serves and renews them without new orders, and
``tlsproxy certs`` lists them. One small JSON list, rewritten under a storage lock."""

from __future__ import annotations

import json

from acme_client.storage import Storage

KEY = "acme/on-demand.json"
LOCK_TIMEOUT = 10.0


class OnDemandIndex:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def names(self) -> list[str]:
        raw = self.storage.load(KEY)
        if raw is None:
            return []
        try:
            names = json.loads(raw)
        except ValueError:
            return []
        return [str(n) for n in names] if isinstance(names, list) else []

    def add(self, name: str) -> None:
        with self.storage.lock("on-demand-index", LOCK_TIMEOUT):
            names = self.names()
            if name not in names:
                self.storage.store(KEY, json.dumps(sorted([*names, name])).encode())
