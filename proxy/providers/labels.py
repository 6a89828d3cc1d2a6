"""Container labels to sites, as Traefik's Docker provider reads them: pure, no I/O.

An app container says how to reach it with labels (``tlsproxy`` is ``[docker] label_prefix``)::

    tlsproxy.enable=true
    tlsproxy.hosts=api.example.com,www.example.com
    tlsproxy.port=8000                 # optional when the image exposes exactly one port
    tlsproxy.hsts=max-age=63072000     # optional

Each label is checked as the same key of a ``[[sites]]`` table would be (the same parser,
the same messages), and a container with a bad label is skipped with a message naming it,
never half-used. Several running containers that name the same host are that host's
upstreams, load-balanced; hosts served by exactly the same containers form one site (one
certificate). The result is sorted, so the same containers always give the same sites and a
caller can compare two results to see whether anything changed.

Where a container is reached: ``127.0.0.1:port`` with ``--network host``; otherwise its
address on ``[docker] network``, or on its only network when that is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config import ConfigError, DockerConfig, Site, Upstream, parse_site

HOST_NETWORK = "host"


@dataclass(frozen=True, slots=True)
class Container:
    """What discovery needs of one running container (``GET /containers/{id}/json``)."""

    name: str
    labels: Mapping[str, str]
    network_mode: str  # "host", "bridge", a network name, "container:<id>"...
    addresses: Mapping[str, str]  # network name -> the container's IP on it
    ports: tuple[int, ...]  # the ports it exposes (inside the container)

    @classmethod
    def from_inspect(cls, item: Mapping[str, Any]) -> Container:
        """From ``GET /containers/{id}/json``: the one answer that Docker and podman fill
        alike (podman's container list has no HostConfig, and no networks for a container
        on the host's network)."""
        config = item.get("Config") or {}
        networks = (item.get("NetworkSettings") or {}).get("Networks") or {}
        ports = {str(p).split("/")[0] for p in config.get("ExposedPorts") or {}}
        return cls(
            name=str(item.get("Name") or str(item.get("Id", "?"))[:12]).lstrip("/"),
            labels=dict(config.get("Labels") or {}),
            network_mode=str((item.get("HostConfig") or {}).get("NetworkMode") or ""),
            addresses={
                str(name): str(network.get("IPAddress") or "")
                for name, network in networks.items()
                if isinstance(network, dict)
            },
            ports=tuple(sorted(int(p) for p in ports if p.isdigit())),
        )


@dataclass(frozen=True, slots=True)
class DiscoveredSite:
    """A site from labels, and the containers it came from (for the status page and logs)."""

    site: Site
    containers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Backend:
    container: str
    upstream: Upstream
    hosts: tuple[str, ...]
    hsts: str | None


def discover(
    containers: Iterable[Container], settings: DockerConfig
) -> tuple[tuple[DiscoveredSite, ...], list[str]]:
    """The sites the containers' labels ask for, and one problem line per skipped container."""
    backends: list[_Backend] = []
    problems: list[str] = []
    for container in sorted(containers, key=lambda c: c.name):
        if not wanted(container.labels, settings):
            continue
        try:
            backends.append(_backend(container, settings.label_prefix, settings.network))
        except _Skip as skip:
            problems.append(f"container {container.name}: {skip}; not routed")
    return _group(backends, problems), problems


class _Skip(Exception):
    """Why a container's labels cannot be used."""


def wanted(labels: Mapping[str, str], settings: DockerConfig) -> bool:
    """Whether a container with these labels is to be routed (before any is checked)."""
    flag = labels.get(f"{settings.label_prefix}.enable", "").strip().lower()
    if settings.exposed_by_default:
        return flag != "false" and f"{settings.label_prefix}.hosts" in labels
    return flag == "true"


def _backend(container: Container, prefix: str, network: str) -> _Backend:
    labels = container.labels
    hosts_label = f"{prefix}.hosts"
    if not labels.get(hosts_label, "").strip():
        raise _Skip(f"no {hosts_label} label")
    port = _port(container, f"{prefix}.port")
    table: dict[str, object] = {
        "hosts": [h.strip() for h in labels[hosts_label].split(",")],
        "upstreams": [f"http://{_address(container, network)}:{port}"],
    }
    if f"{prefix}.hsts" in labels:
        table["hsts"] = labels[f"{prefix}.hsts"]
    try:
        site = parse_site(table, "labels")
    except ConfigError as error:  # the same checks and words as a [[sites]] table's
        message = "; ".join(error.problems)
        for key in ("hosts", "hsts"):
            message = message.replace(f"labels.{key}", f"{prefix}.{key}")
        raise _Skip(message.replace("labels.upstreams[0]", "its address")) from None
    wildcards = [h for h in site.hosts if h.startswith("*.")]
    if wildcards:  # its certificate would need DNS-01, and one bad site must not block others
        raise _Skip(f"{hosts_label}: {wildcards[0]!r}: wildcards only in the configuration file")
    return _Backend(container.name, site.upstreams[0], site.hosts, site.hsts)


def _port(container: Container, label: str) -> int:
    text = container.labels.get(label, "").strip()
    if not text:
        if len(container.ports) == 1:
            return container.ports[0]
        raise _Skip(f"no {label} label, and it exposes {len(container.ports)} ports, not one")
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise _Skip(f"{label}={text!r} is not a port number (1-65535)")
    return int(text)


def _address(container: Container, network: str) -> str:
    if container.network_mode == HOST_NETWORK:
        return "127.0.0.1"
    if network:
        address = container.addresses.get(network, "")
        if not address:
            raise _Skip(f"not on the network {network!r} ([docker] network)")
    else:
        usable = [a for a in container.addresses.values() if a]
        if len(usable) != 1:
            raise _Skip(
                f"on {len(usable)} networks with an address: set [docker] network to choose one"
            )
        address = usable[0]
    return f"[{address}]" if ":" in address else address


def _group(backends: Sequence[_Backend], problems: list[str]) -> tuple[DiscoveredSite, ...]:
    """Hosts served by the same containers become one site; each host's HSTS is the first
    (by container name) container's that sets one."""
    by_host: dict[str, list[_Backend]] = {}
    for backend in backends:
        for host in backend.hosts:
            by_host.setdefault(host, []).append(backend)
    groups: dict[tuple[tuple[Upstream, ...], str | None], list[str]] = {}
    names: dict[tuple[tuple[Upstream, ...], str | None], tuple[str, ...]] = {}
    for host, serving in sorted(by_host.items()):
        upstreams = tuple(dict.fromkeys(b.upstream for b in serving))
        values = list(dict.fromkeys(b.hsts for b in serving if b.hsts is not None))
        if len(values) > 1:
            problems.append(f"host {host}: containers disagree on hsts; using {values[0]!r}")
        key = (upstreams, values[0] if values else None)
        groups.setdefault(key, []).append(host)
        names[key] = tuple(b.container for b in serving)
    sites = [
        DiscoveredSite(Site(hosts=tuple(hosts), upstreams=upstreams, hsts=hsts), names[key])
        for key, hosts in groups.items()
        for upstreams, hsts in [key]
    ]
    return tuple(sorted(sites, key=lambda d: d.site.hosts))
