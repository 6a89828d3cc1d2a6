"""What ``run`` would refuse on this machine, found before anything starts (``tlsproxy check``).

:func:`proxy.config.start_problems` judges a configuration by itself. :func:`local_problems`
looks at what it names on disk, as the proxy will read it at start: each site's ``cert`` and
``key`` (read and checked by the very code that loads them), the storage directory (it must
be one, or be creatable), an internal CA already in it (a CA that exists but cannot be
loaded is never replaced, since users may trust it, so the proxy refuses to start), and
DNS-01's TSIG secret file or ``exec`` program. Nothing is created or written: ``check`` may
run before the first start, or beside a running proxy.

Kept apart from ``start_problems`` because example configurations (the docs') name files
that exist only on the machines they are written for.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
from pathlib import Path

from proxy.certs.acme_sites import ACMESource
from proxy.certs.files import FileSource
from proxy.certs.internal import InternalSource, TemporarySource
from proxy.certs.internal_ca import ROOT_CERT, ROOT_KEY, InternalCA, InternalCAError
from proxy.certs.protocol import CertificateError
from proxy.certs.solvers import read_secret
from proxy.certs.sources import CertificateSources
from proxy.config import Config, DNSConfig, Site, start_problems


def problems(config: Config) -> list[str]:
    """Everything ``run`` would refuse, one line per problem, each naming its key."""
    return start_problems(config) + local_problems(config)


def local_problems(config: Config) -> list[str]:
    """The files and directories ``config`` names that the proxy could not use at start."""
    found: list[str] = []
    for index, site in enumerate(config.sites):
        if site.cert is not None and site.key is not None:
            found += _pair_problems(index, site)
    directory = config.tls.location.directory
    if directory is not None and any(_without_files(site) for site in config.sites):
        storage_problems = _storage_problems(config.tls.storage)
        found += storage_problems
        if not storage_problems and _needs_ca(config):
            found += _ca_problems(directory / "ca")
    return found + _dns_problems(config.acme.dns)


def _dns_problems(dns: DNSConfig | None) -> list[str]:
    """The TSIG secret file (readable, base64) or the exec provider's program."""
    if dns is None:
        return []
    if dns.provider == "exec" and dns.command and shutil.which(dns.command[0]) is None:
        return [f"acme.dns.command[0]: {dns.command[0]!r}: no such executable program"]
    if dns.provider != "rfc2136" or not dns.tsig_secret_file:
        return []
    path = dns.tsig_secret_file
    try:
        secret = read_secret(path)
        base64.b64decode(secret, validate=True)
    except OSError as error:
        return [f"acme.dns.tsig_secret_file: cannot read {path!r}: {error.strerror or error}"]
    except binascii.Error:
        return [f"acme.dns.tsig_secret_file: {path!r} does not hold a base64 secret"]
    return []


def _without_files(site: Site) -> bool:
    return site.cert is None and site.key is None


def _pair_problems(index: int, site: Site) -> list[str]:
    assert site.cert is not None and site.key is not None
    unreadable = []
    for key, path in (("cert", site.cert), ("key", site.key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            reason = error.strerror or str(error)
            unreadable.append(f"sites[{index}].{key}: cannot read {path!r}: {reason}")
    if unreadable:
        return unreadable
    try:
        FileSource(site).load()
    except CertificateError as error:
        about_key = error.reason.startswith(("no unencrypted PEM private key", site.key))
        return [f"sites[{index}].{'key' if about_key else 'cert'}: {error.reason}"]
    return []


def _storage_problems(location: str) -> list[str]:
    """The storage directory, or the nearest existing folder it would be created in."""
    path = Path(location)
    try:
        if path.exists():
            return [] if path.is_dir() else [f"tls.storage: {location!r} is not a directory"]
        parent = next(folder for folder in path.absolute().parents if folder.exists())
    except OSError as error:
        return [f"tls.storage: cannot look at {location!r}: {error.strerror or error}"]
    if not parent.is_dir():
        return [f"tls.storage: cannot create {location!r}: {str(parent)!r} is not a directory"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"tls.storage: cannot create {location!r}: no permission to write in {parent}"]
    return []


def _needs_ca(config: Config) -> bool:
    """Whether start loads the internal CA: for internal certificates, for a temporary
    certificate while an ACME site has none stored, and for the default certificate when
    no site has one of its own."""
    return any(
        isinstance(source, InternalSource | TemporarySource)
        or (
            isinstance(source, ACMESource)
            and source.temporary is not None
            and source.status().not_after == "-"
        )
        for source in CertificateSources(config.tls, config.acme).for_sites(config.sites)
    )


def _ca_problems(directory: Path) -> list[str]:
    if not (directory / ROOT_CERT).exists() and not (directory / ROOT_KEY).exists():
        return []  # created at the first start
    try:
        InternalCA._load(directory)
    except InternalCAError as error:
        return [
            f"tls.storage: {error} (an existing CA is never replaced, as browsers may trust "
            f"it: restore it, or move {directory} away to have a new one made)"
        ]
    return []
