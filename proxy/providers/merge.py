"""One rule for sites from several providers: the configuration file wins. Pure.

A host that the file names is the file's, whatever a container's labels say; the labelled
site keeps its other hosts, and disappears if none are left. The file's sites come first,
unchanged, so a file-only setup routes exactly as before discovery existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from proxy.config import Site
from proxy.providers.labels import DiscoveredSite

FILE = "file"


@dataclass(frozen=True, slots=True)
class Merged:
    """The sites to serve, where each came from (site name -> origin), and the labelled
    hosts the file overrides (host -> the containers that asked for it)."""

    sites: tuple[Site, ...]
    origins: dict[str, str]
    overridden: dict[str, tuple[str, ...]]


def merge(file_sites: Sequence[Site], discovered: Sequence[DiscoveredSite]) -> Merged:
    taken = {host for site in file_sites for host in site.hosts}
    sites = list(file_sites)
    origins = {site.name: FILE for site in file_sites}
    overridden: dict[str, tuple[str, ...]] = {}
    for found in discovered:
        hosts = tuple(h for h in found.site.hosts if h not in taken)
        overridden.update((h, found.containers) for h in found.site.hosts if h in taken)
        if not hosts:
            continue
        site = found.site if hosts == found.site.hosts else replace(found.site, hosts=hosts)
        sites.append(site)
        origins[site.name] = "docker: " + ", ".join(found.containers)
    return Merged(tuple(sites), origins, overridden)
