"""Which source each certificate of a configuration comes from, and the ``certs`` table.

A site with ``cert``/``key`` files: :class:`~proxy.certs.files.FileSource`. Otherwise
``[tls] issuer`` decides: ``internal`` gives an
:class:`~proxy.certs.internal.InternalSource`, ``acme`` an
:class:`~proxy.certs.acme_sites.ACMESource` (with a temporary stand-in). Each name obtained on
demand that an on-demand site still covers is an ACME source of its own. When no site has a
certificate of its own (on-demand sites only, or sites only from container labels), a
temporary certificate is the default one, for clients that send no server name.

:class:`CertificateSources` builds them for one configuration and holds what they share (the
internal CA, the ACME renewer), so a reload that keeps the settings keeps the running sources.

``CertificateError`` and ``CertificateStatus`` are re-exported: the library API (``proxy``)
and the status page import them from here.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from acme_client.interfaces import ChallengeStore, MemoryChallengeStore
from acme_client.ondemand_index import OnDemandIndex
from proxy.certs.acme_sites import ACMESource, Issuance
from proxy.certs.files import FileSource
from proxy.certs.internal import InternalSource, TemporarySource
from proxy.certs.internal_ca import DEFAULT_LEAF_LIFETIME, InternalCA, InternalCAError
from proxy.certs.on_demand import matches
from proxy.certs.protocol import CertificateError as CertificateError
from proxy.certs.protocol import CertificateStatus as CertificateStatus
from proxy.certs.protocol import Source
from proxy.config import ACMEConfig, Site, TLSConfig

log = logging.getLogger("tlsproxy.certs")

DEFAULT_NAME = "default.invalid"  # the default certificate's name when no site has one
DEFAULT_LABEL = "temporary: for clients that send no server name (no site has a certificate)"

_local: dict[str, Path] = {}


def local_directory(tls: TLSConfig) -> Path:
    """Where the internal CA lives: the storage directory, or, with Redis storage, a
    private directory of this process (temporary certificates are never shared)."""
    if tls.location.directory is not None:
        return tls.location.directory
    if tls.storage not in _local:
        _local[tls.storage] = Path(tempfile.mkdtemp(prefix="tlsproxy-"))
    return _local[tls.storage]


class CertificateSources:
    """The certificate sources of one configuration, and what they share."""

    def __init__(
        self,
        tls: TLSConfig,
        acme: ACMEConfig | None = None,
        *,
        challenges: ChallengeStore | None = None,
        http_listen: bool = True,
        lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.tls = tls
        self.acme = acme or ACMEConfig()
        self.http_listen = http_listen
        self.lifetime = lifetime  # of internal leaves
        self.key = (tls.storage, tls.issuer, self.acme, http_listen, lifetime)
        self.issuance: Issuance | None = None
        if tls.issuer == "acme" and tls.location.kind != "unsupported":
            challenges = challenges if challenges is not None else MemoryChallengeStore()
            self.issuance = Issuance(
                tls, self.acme, challenges, http_listen=http_listen, on_change=on_change
            )
        self._ca: InternalCA | None = None
        self._ca_lock = threading.Lock()

    def load_ca(self, site: str) -> InternalCA:
        """The internal CA, loaded (or created) the first time a source needs it."""
        with self._ca_lock:
            if self._ca is None:
                try:
                    self._ca = InternalCA.load_or_create(local_directory(self.tls) / "ca")
                except (OSError, InternalCAError) as exc:
                    raise CertificateError(site, f"internal CA: {exc}") from exc
            return self._ca

    @property
    def ca(self) -> InternalCA | None:
        """The internal CA, once a source has needed it."""
        return self._ca

    def for_site(self, site: Site) -> Source | None:
        """The source of a site's certificate; None for an on-demand site (its names get
        theirs at their first handshake). Raises :class:`CertificateError`."""
        if site.cert is not None or site.key is not None:
            return FileSource(site)
        if site.on_demand:
            return None
        if self.tls.issuer == "internal":
            directory = self.tls.location.directory
            if directory is None:
                reason = f"the internal issuer needs a directory as tls.storage, not {self.tls}"
                raise CertificateError(site.name, reason)
            return InternalSource(site.hosts, self.load_ca, directory, self.lifetime)
        return self.acme_source(site.hosts, TemporarySource(site.hosts, self.load_ca))

    def acme_source(self, names: tuple[str, ...], temporary: TemporarySource | None) -> ACMESource:
        if self.issuance is None:
            raise CertificateError(names[0], f"ACME: unusable storage {self.tls.location}")
        return ACMESource(names, self.issuance, temporary)

    def for_sites(self, sites: Sequence[Site]) -> list[Source]:
        """Every source ``sites`` need, in the order of the sites (the first is the default
        certificate), then on-demand names (blocking: reads their index in storage)."""
        found = [source for site in sites if (source := self.for_site(site)) is not None]
        own = bool(found)
        found += [self.acme_source((name,), None) for name in self.on_demand_names(sites)]
        if not own:
            found.append(TemporarySource((DEFAULT_NAME,), self.load_ca, DEFAULT_LABEL))
        return found

    def on_demand_names(self, sites: Sequence[Site]) -> list[str]:
        """The names that got a certificate on demand (any process's: the index is in
        storage) and that an on-demand site of ``sites`` still covers."""
        patterns = [host for site in sites if site.on_demand for host in site.hosts]
        if not patterns or self.issuance is None:
            return []
        try:
            names = OnDemandIndex(self.issuance.storage).names()
        except Exception as exc:  # Redis unreachable: the configured sites still work
            log.warning("on-demand names unreadable: %s", exc)
            return []
        return [name for name in names if any(matches(p, name) for p in patterns)]

    def remember_on_demand(self, name: str) -> None:
        """Write ``name`` to the on-demand index in storage, so that restarts and the other
        processes serve and renew it too (blocking)."""
        if self.issuance is not None:
            OnDemandIndex(self.issuance.storage).add(name)

    def close(self) -> None:
        """This configuration is replaced: stop what watches storage for it."""
        if self.issuance is not None:
            self.issuance.close()


# -- the `certs` table ------------------------------------------------------------------


def certificate_sites(sites: Sequence[Site], tls: TLSConfig) -> list[Site]:
    """The sites, then one per name an on-demand site got a certificate for (its own)."""
    names = CertificateSources(tls).on_demand_names(sites) if tls.issuer == "acme" else []
    return [*sites, *(Site((name,), ()) for name in names)]


def describe_certificates(
    sites: Sequence[Site], tls: TLSConfig, acme: ACMEConfig | None = None
) -> list[CertificateStatus]:
    """What each :func:`certificate_sites` entry would serve now, from files and storage;
    creates and issues nothing."""
    sources = CertificateSources(tls, acme)
    rows = []
    for site in certificate_sites(sites, tls):
        try:
            source = sources.for_site(site)
        except CertificateError as exc:
            rows.append(CertificateStatus(site.hosts, tls.issuer, "-", "-", exc.reason))
            continue
        if source is None:
            rows.append(CertificateStatus(site.hosts, tls.issuer, "-", "-", None))
        else:
            rows.append(source.status())
    return rows
