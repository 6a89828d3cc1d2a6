"""Several CAs, tried in order for every order (Caddy's Let's Encrypt -> ZeroSSL fallback).

When a CA is down, rate-limits us or refuses an order, the next one is asked, so a new site
still gets a certificate during one CA's outage. Every order starts again from the first CA:
a fallback is for this order only, and the next renewal goes back to the preferred CA. Each
CA has its own account (``acme/<ca>/account/``); :class:`~acme_client.issuer.Issued` says
which CA issued the certificate, and the renewer records it in the metadata.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime

from acme_client.issuer import Issued, Issuer
from acme_client.network import ACMEFailure

log = logging.getLogger("tlsproxy.acme")


class FallbackIssuer:
    """Obtains a certificate from the first of ``issuers`` that can issue it."""

    def __init__(self, issuers: Sequence[Issuer]) -> None:
        if not issuers:
            raise ValueError("at least one issuer is needed")
        self.issuers = tuple(issuers)

    def obtain(self, names: Sequence[str], cancel: threading.Event | None = None) -> Issued:
        """The first CA's certificate, or the next one's when it fails; raises one
        :class:`ACMEFailure` naming every CA's error when all of them fail."""
        failures: list[tuple[str, ACMEFailure]] = []
        for position, issuer in enumerate(self.issuers):
            directory = issuer.account.settings.directory
            try:
                return issuer.obtain(names, cancel)
            except ACMEFailure as error:
                if cancel is not None and cancel.is_set():
                    raise
                failures.append((directory, error))
                if position + 1 < len(self.issuers):
                    following = self.issuers[position + 1].account.settings.directory
                    log.warning(
                        "order for %s at %s failed (%s): trying the next CA, %s",
                        " ".join(names),
                        directory,
                        error,
                        following,
                    )
        raise combined(failures)

    def renewal_window(
        self, chain_pem: bytes, directory: str = ""
    ) -> tuple[datetime, datetime] | None:
        """ARI from the CA that issued the certificate (``directory``; the first CA if none
        of ours matches)."""
        chosen = next(
            (i for i in self.issuers if i.account.settings.directory == directory),
            self.issuers[0],
        )
        return chosen.renewal_window(chain_pem)


def combined(failures: Sequence[tuple[str, ACMEFailure]]) -> ACMEFailure:
    """One failure for the metadata and the log: the first CA's error type, every CA's
    detail; a retry time only when every CA asked for one (the earliest)."""
    if len(failures) == 1:
        return failures[0][1]
    detail = "; ".join(f"{directory}: {error}" for directory, error in failures)
    waits = [error.retry_after for _, error in failures]
    retry_after = min(w for w in waits if w is not None) if None not in waits else None
    return ACMEFailure(f"every CA failed ({len(failures)})", detail, retry_after)
