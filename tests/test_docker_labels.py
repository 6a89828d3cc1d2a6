"""Container labels to sites, and the one merge rule: pure functions, no engine.

proxy/providers/labels.py reads what ``GET /containers/{id}/json`` answers (Docker and
podman alike) and proxy/providers/merge.py puts the result beside the file's sites; the
engine itself is in tests/test_docker_discovery.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError, DockerConfig, Site, Upstream, parse_config
from proxy.providers.labels import Container, DiscoveredSite, discover
from proxy.providers.merge import merge

DEFAULT = DockerConfig()


def inspected(
    name: str,
    labels: dict[str, str],
    *,
    mode: str = "host",
    networks: dict[str, str] | None = None,
    exposed: tuple[str, ...] = (),
) -> Container:
    """A container as the inspect endpoint describes it."""
    item: dict[str, Any] = {
        "Id": name * 4,
        "Name": f"/{name}",
        "Config": {"Labels": labels, "ExposedPorts": {p: {} for p in exposed} or None},
        "HostConfig": {"NetworkMode": mode},
        "NetworkSettings": {
            "Networks": {n: {"IPAddress": ip} for n, ip in (networks or {}).items()}
        },
    }
    return Container.from_inspect(item)


def app(name: str, hosts: str, port: str = "8000", **labels: str) -> Container:
    return inspected(
        name,
        {"tlsproxy.enable": "true", "tlsproxy.hosts": hosts, "tlsproxy.port": port, **labels},
    )


def sites(*containers: Container, settings: DockerConfig = DEFAULT) -> list[tuple[Any, ...]]:
    found, problems = discover(containers, settings)
    assert problems == []
    return [(d.site.hosts, [u.url for u in d.site.upstreams], d.containers) for d in found]


def test_a_container_on_the_host_network_is_reached_on_loopback() -> None:
    found, problems = discover(
        [app("api", "API.example.com, www.example.com", **{"tlsproxy.hsts": "max-age=60"})], DEFAULT
    )
    assert problems == []
    assert found == (
        DiscoveredSite(
            Site(
                hosts=("api.example.com", "www.example.com"),
                upstreams=(Upstream("127.0.0.1", 8000),),
                hsts="max-age=60",
            ),
            ("api",),
        ),
    )


def test_containers_with_the_same_hosts_are_one_load_balanced_site() -> None:
    both = sites(app("b", "a.test,www.a.test", "8001"), app("a", "a.test,www.a.test", "8002"))
    assert both == [
        (
            ("a.test", "www.a.test"),
            ["http://127.0.0.1:8002", "http://127.0.0.1:8001"],  # by container name
            ("a", "b"),
        )
    ]


def test_hosts_served_by_different_containers_are_different_sites() -> None:
    found = sites(app("one", "a.test,shared.test", "8001"), app("two", "shared.test", "8002"))
    assert found == [
        (("a.test",), ["http://127.0.0.1:8001"], ("one",)),
        (("shared.test",), ["http://127.0.0.1:8001", "http://127.0.0.1:8002"], ("one", "two")),
    ]


def test_the_address_on_a_network() -> None:
    labels = {"tlsproxy.enable": "true", "tlsproxy.hosts": "a.test", "tlsproxy.port": "80"}
    one = inspected("x", labels, mode="bridge", networks={"front": "172.20.0.5"})
    assert sites(one)[0][1] == ["http://172.20.0.5:80"]
    two = inspected("y", labels, mode="app", networks={"front": "172.20.0.5", "back": "fd00::7"})
    assert sites(two, settings=DockerConfig(network="back"))[0][1] == ["http://[fd00::7]:80"]
    _, problems = discover([two], DEFAULT)
    assert problems == [
        "container y: on 2 networks with an address: set [docker] network to choose one; not routed"
    ]


def test_the_only_exposed_port_when_no_port_label() -> None:
    labels = {"tlsproxy.enable": "true", "tlsproxy.hosts": "a.test"}
    assert sites(inspected("x", labels, exposed=("8080/tcp",)))[0][1] == ["http://127.0.0.1:8080"]
    _, problems = discover([inspected("x", labels, exposed=("80/tcp", "443/tcp"))], DEFAULT)
    assert problems == [
        "container x: no tlsproxy.port label, and it exposes 2 ports, not one; not routed"
    ]


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ({"tlsproxy.port": "8000"}, "container bad: no tlsproxy.hosts label; not routed"),
        (
            {"tlsproxy.hosts": "a.test", "tlsproxy.port": "http"},
            "container bad: tlsproxy.port='http' is not a port number (1-65535); not routed",
        ),
        (
            {"tlsproxy.hosts": "a.test,10.0.0.1", "tlsproxy.port": "1"},
            "container bad: tlsproxy.hosts[1]: '10.0.0.1' is an IP address",
        ),
        (
            {"tlsproxy.hosts": "a.test,*.b.test", "tlsproxy.port": "1"},
            "container bad: tlsproxy.hosts: '*.b.test': wildcards only in the configuration file",
        ),
        (
            {"tlsproxy.hosts": "a.test", "tlsproxy.port": "1", "tlsproxy.hsts": "a\nb"},
            "container bad: tlsproxy.hsts: must be printable ASCII",
        ),
    ],
)
def test_bad_labels_skip_the_container_and_say_which(labels: dict[str, str], problem: str) -> None:
    good = app("good", "good.test")
    found, problems = discover(
        [inspected("bad", {"tlsproxy.enable": "true", **labels}), good], DEFAULT
    )
    assert [d.containers for d in found] == [("good",)]
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_enable_and_exposed_by_default() -> None:
    plain = inspected("plain", {"tlsproxy.hosts": "p.test", "tlsproxy.port": "1"})
    off = inspected(
        "off", {"tlsproxy.enable": "false", "tlsproxy.hosts": "o.test", "tlsproxy.port": "1"}
    )
    unrelated = inspected("db", {"com.example.role": "database"})
    assert sites(plain, off, unrelated) == []
    everything = DockerConfig(exposed_by_default=True)
    assert [s[0] for s in sites(plain, off, unrelated, settings=everything)] == [("p.test",)]
    custom = DockerConfig(label_prefix="edge")
    mine = inspected("m", {"edge.enable": "true", "edge.hosts": "m.test", "edge.port": "2"})
    assert [s[0] for s in sites(mine, plain, settings=custom)] == [("m.test",)]


def test_the_same_containers_give_the_same_sites_in_any_order() -> None:
    containers = [app(n, f"{n}.test,all.test", str(8000 + i)) for i, n in enumerate("cab")]
    assert discover(containers, DEFAULT) == discover(reversed(containers), DEFAULT)


# -- the merge rule --------------------------------------------------------------------------

FILE = Site(hosts=("api.test", "*.apps.test"), upstreams=(Upstream("127.0.0.1", 9000),))


def found(hosts: tuple[str, ...], *containers: str) -> DiscoveredSite:
    return DiscoveredSite(Site(hosts=hosts, upstreams=(Upstream("127.0.0.1", 8000),)), containers)


def test_the_file_wins_for_a_host_both_name() -> None:
    merged = merge([FILE], [found(("api.test", "extra.test"), "app"), found(("x.apps.test",), "w")])
    assert [s.hosts for s in merged.sites] == [FILE.hosts, ("extra.test",), ("x.apps.test",)]
    assert merged.sites[0] is FILE
    assert merged.overridden == {"api.test": ("app",)}
    assert merged.origins == {
        "api.test": "file",
        "extra.test": "docker: app",
        "x.apps.test": "docker: w",
    }


def test_a_labelled_site_left_without_hosts_is_gone() -> None:
    merged = merge([FILE], [found(("api.test",), "a", "b")])
    assert merged.sites == (FILE,)
    assert merged.overridden == {"api.test": ("a", "b")}


def test_without_discovery_the_file_alone() -> None:
    merged = merge([FILE], ())
    assert (merged.sites, merged.overridden) == ((FILE,), {})


# -- the [docker] table ----------------------------------------------------------------------

SITE = {"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"]}


def test_the_docker_table() -> None:
    config = parse_config({"docker": {}})
    assert config.docker == DockerConfig() and config.sites == ()
    assert parse_config({"docker": {}, "sites": []}).sites == ()
    assert parse_config({"sites": [SITE]}).docker is None
    tcp = parse_config(
        {
            "docker": {
                "endpoint": "tcp://docker.internal:2376",
                "label_prefix": "com.example.edge",
                "network": "front",
                "exposed_by_default": True,
                "tls_ca": "/certs/ca.pem",
                "tls_cert": "/certs/cert.pem",
                "tls_key": "/certs/key.pem",
            }
        }
    ).docker
    assert (
        tcp is not None and tcp.endpoint == "tcp://docker.internal:2376" and tcp.exposed_by_default
    )


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"endpoint": "/var/run/docker.sock"}, "docker.endpoint: expected 'unix:///var/run/"),
        ({"endpoint": "http://127.0.0.1:2375"}, "docker.endpoint: expected"),
        ({"label_prefix": "Traefik!"}, "docker.label_prefix: expected a label prefix"),
        ({"exposed_by_default": "yes"}, "docker.exposed_by_default: expected"),
        ({"tls_cert": "/c.pem"}, "docker.tls_key: missing: tls_cert is set"),
        ({"tls_ca": "/ca.pem"}, "docker.endpoint: TLS files are for a tcp:// endpoint"),
        ({"labels": "x"}, "docker: unknown key 'labels'"),
    ],
)
def test_docker_table_problems_name_the_key(table: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"docker": table})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_without_docker_a_site_is_still_needed() -> None:
    with pytest.raises(ConfigError, match="sites: at least one site is needed"):
        parse_config({})
