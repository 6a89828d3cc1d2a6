"""What every certificate source does: the one protocol behind files, the internal CA, ACME
and temporary certificates (certmagic's ``Issuer`` and its maintenance, in one small shape).

A source stands for one certificate: the names it covers and where it comes from. The
manager (:mod:`proxy.certs.manager`) asks each source the same four things, so its one
maintenance loop needs to know nothing of files, CAs or storage:

* ``load`` — what to serve when the source starts being managed (from files or storage, or
  issued now); errors name the site, and nothing is served from a source that failed;
* ``look`` — cheap, on every poll: did something outside change it (a file rewritten,
  another process's renewal in storage)?
* ``due`` / ``renew`` — when the schedule (:mod:`acme_client.schedule`, the only place
  that knows the renewal rule and the backoffs) says so: obtain or re-issue. Slow (an ACME
  order), so the loop runs it apart from the looks; a failure is the source's to log and
  back off, and the old certificate keeps serving;
* ``status`` — its row of ``tlsproxy certs``, read from files and storage, with no side
  effects (no proxy needs to run).

All but ``names``, ``identity``, ``due`` and ``close`` block; the manager calls them in
worker threads, one at a time per source.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from proxy.certs.store import CertEntry


class CertificateError(Exception):
    """A site's certificate cannot be loaded or issued; the message names site and reason."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"site {site}: {reason}")
        self.site = site
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    """One row of ``tlsproxy certs``, read from files and storage (no proxy running)."""

    names: tuple[str, ...]
    issuer: str
    not_after: str
    next_renewal: str
    last_error: str | None


class Source(Protocol):
    """Where one certificate comes from, and how it is kept fresh."""

    @property
    def names(self) -> tuple[str, ...]:
        """The names the certificate covers; the manager knows the source by them."""
        ...

    @property
    def identity(self) -> Hashable:
        """Equal for sources that would do the same thing: a reload keeps a running source
        whose identity it asks for again, and replaces one whose identity changed."""
        ...

    def load(self, serving: CertEntry | None) -> CertEntry | None:
        """The certificate to serve from now on; None keeps ``serving`` (what the store
        serves for these names now, if anything). Raises :class:`CertificateError`."""
        ...

    def look(self) -> CertEntry | None:
        """A certificate changed from outside since the last call, or None. Quick."""
        ...

    def due(self, now: datetime) -> datetime | None:
        """When :meth:`renew` has work, as the schedule says; None: never (files)."""
        ...

    def renew(self, now: datetime) -> CertEntry | None:
        """Obtain or re-issue; the new certificate, or None (not due after all, or failed:
        logged, retried at the next :meth:`due`). Never raises for a failed order."""
        ...

    def close(self) -> None:
        """No longer managed: stop an order in flight soon. Never blocks."""
        ...

    def status(self) -> CertificateStatus:
        """The ``tlsproxy certs`` row, from files and storage; creates and issues nothing."""
        ...
