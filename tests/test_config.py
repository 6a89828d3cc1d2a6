"""The configuration file as a user meets it: what parses to what, and what each mistake says."""

from __future__ import annotations

import ipaddress
import pickle
import string
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import (
    LETS_ENCRYPT,
    ACMEConfig,
    Address,
    Config,
    ConfigError,
    Route,
    ServerConfig,
    Site,
    TLSConfig,
    Upstream,
    load_config,
    parse_address,
    parse_config,
    parse_host,
    parse_upstream,
    start_problems,
)

# The example from config-contract.md, with the commented-out site keys switched on.
CONTRACT_EXAMPLE = """
[server]
https_listen = ["0.0.0.0:443"]          # host:port, several allowed, [::]:443 for IPv6
http_listen = ["0.0.0.0:80"]            # serves ACME HTTP-01 and redirects to HTTPS; [] = off
https_port = 443                        # port written into redirects (when published differently)
workers = 1                             # processes sharing the listeners (SO_REUSEPORT)
trusted_proxies = []                    # CIDRs whose X-Forwarded-*/Forwarded we keep and extend
admin_listen = "127.0.0.1:9901"         # /metrics, /healthz; "" = off
access_log = "text"                     # "text" | "json" | "off"

[tls]
storage = "./tlsproxy-data"            # certificates, keys, ACME account, internal CA;
issuer = "acme"                         # "acme" | "internal"

[acme]
directory = "https://acme-v02.api.letsencrypt.org/directory"
email = "ops@example.com"
ca_bundle = ""                          # extra trust for a private ACME server (e.g. Pebble)

[[sites]]
hosts = ["api.example.com", "*.apps.example.com"]
upstreams = ["http://127.0.0.1:8000"]   # several = load balanced
cert = "/etc/letsencrypt/live/api.example.com/fullchain.pem"
key = "/etc/letsencrypt/live/api.example.com/privkey.pem"
hsts = "max-age=63072000; includeSubDomains"
"""

MINIMAL = """
[[sites]]
hosts = ["app.example.com"]
upstreams = ["http://127.0.0.1:8000"]
"""


def problems(text: str) -> list[str]:
    """The problems a user is shown for a TOML text (which must have some)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    return caught.value.problems


def site(**keys: object) -> dict[str, object]:
    """A valid site table with some keys replaced."""
    return {"hosts": ["app.example.com"], "upstreams": ["http://127.0.0.1:8000"], **keys}


def site_problems(**keys: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"sites": [site(**keys)]})
    return caught.value.problems


def test_contract_example_parses_to_the_expected_objects() -> None:
    assert parse_config(tomllib.loads(CONTRACT_EXAMPLE)) == Config(
        server=ServerConfig(
            https_listen=(Address("0.0.0.0", 443),),
            http_listen=(Address("0.0.0.0", 80),),
            https_port=443,
            workers=1,
            trusted_proxies=(),
            admin_listen=Address("127.0.0.1", 9901),
            access_log="text",
        ),
        tls=TLSConfig(storage="./tlsproxy-data", issuer="acme"),
        acme=ACMEConfig(directory=LETS_ENCRYPT, email="ops@example.com", ca_bundle=""),
        sites=(
            Site(
                hosts=("api.example.com", "*.apps.example.com"),
                upstreams=(Upstream("127.0.0.1", 8000),),
                cert="/etc/letsencrypt/live/api.example.com/fullchain.pem",
                key="/etc/letsencrypt/live/api.example.com/privkey.pem",
                hsts="max-age=63072000; includeSubDomains",
            ),
        ),
    )


def test_a_minimal_file_gets_the_documented_defaults() -> None:
    config = parse_config(tomllib.loads(MINIMAL))
    assert config == Config(sites=(Site(("app.example.com",), (Upstream("127.0.0.1", 8000),)),))
    server = config.server
    assert [str(a) for a in server.https_listen] == ["0.0.0.0:443"]
    assert [str(a) for a in server.http_listen] == ["0.0.0.0:80"]
    assert str(server.admin_listen) == "127.0.0.1:9901"
    assert (server.https_port, server.workers, server.trusted_proxies) == (443, 1, ())
    assert (server.access_log, server.loop) == ("text", "uvloop")
    assert server.handshake_timeout == 10.0
    assert server.keepalive_timeout == 75.0
    assert server.upstream_connect_timeout == 5.0
    assert server.upstream_timeout == 60.0
    assert server.shutdown_timeout == 30.0
    assert config.tls == TLSConfig(storage="./tlsproxy-data", issuer="acme")
    assert config.acme == ACMEConfig(directory=LETS_ENCRYPT, email="", ca_bundle="")
    assert config.sites[0].name == "app.example.com"


def test_every_key_we_added_parses() -> None:
    config = parse_config(
        tomllib.loads(
            """
            [server]
            https_listen = ["[::]:8443", "127.0.0.1:8443"]
            http_listen = []
            https_port = 8443
            workers = "auto"
            trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "10.1.2.3/16"]
            admin_listen = ""
            access_log = "json"
            loop = "asyncio"
            handshake_timeout = 2.5
            keepalive_timeout = 5
            upstream_connect_timeout = 1
            upstream_timeout = 300
            shutdown_timeout = 0.5

            [tls]
            storage = "redis://cache:6379/0"
            issuer = "internal"

            [acme]
            directory = "http://localhost:14000/dir"

            [[sites]]
            hosts = ["Shop.Example.COM."]
            upstreams = ["http://[::1]:8000", "http://app", "http://APP.internal:9000/"]
            routes = [
                { path = "/api", upstreams = ["http://api:8080"] },
                { path = "/", upstreams = ["http://web"] },
            ]
            """
        )
    )
    server = config.server
    assert server.https_listen == (Address("::", 8443), Address("127.0.0.1", 8443))
    assert str(server.https_listen[0]) == "[::]:8443"
    assert server.http_listen == ()
    assert server.admin_listen is None
    assert server.workers == "auto"
    assert server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.1.0.0/16"),
    )
    assert (server.access_log, server.loop) == ("json", "asyncio")
    assert server.keepalive_timeout == 5.0
    assert isinstance(server.keepalive_timeout, float)
    assert config.tls == TLSConfig(storage="redis://cache:6379/0", issuer="internal")
    assert config.acme.directory == "http://localhost:14000/dir"
    (only,) = config.sites
    assert only.hosts == ("shop.example.com",)
    assert only.upstreams == (
        Upstream("::1", 8000),
        Upstream("app", 80),
        Upstream("app.internal", 9000),
    )
    assert only.upstreams[0].url == "http://[::1]:8000"
    assert only.routes == (
        Route("/api", (Upstream("api", 8080),)),
        Route("/", (Upstream("web", 80),)),
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[server]\nhttps_listen = "0.0.0.0:443"',
            "server.https_listen: expected a list, got a string",
        ),
        ("[server]\nhttps_listen = []", "server.https_listen: at least one address is needed"),
        ('[server]\nhttps_listen = ["0.0.0.0"]', "server.https_listen[0]: expected 'host:port'"),
        ('[server]\nhttps_listen = ["::1:443"]', "server.https_listen[0]: expected 'host:port'"),
        ('[server]\nhttps_listen = ["[x]:443"]', "server.https_listen[0]: expected 'host:port'"),
        (
            '[server]\nhttp_listen = ["0.0.0.0:0"]',
            "server.http_listen[0]: '0.0.0.0:0': port 0 is out",
        ),
        (
            '[server]\nhttp_listen = ["[::]:65536"]',
            "server.http_listen[0]: '[::]:65536': port 65536",
        ),
        (
            "[server]\nhttps_port = true",
            "server.https_port: expected a port number (1-65535), got a boolean (true)",
        ),
        ("[server]\nhttps_port = 70000", "server.https_port: port 70000 is out of range"),
        ('[server]\nhttps_port = "443"', "server.https_port: expected a port number"),
        (
            "[server]\nworkers = 0",
            'server.workers: expected a number of processes (1 or more) or "auto"',
        ),
        ("[server]\nworkers = true", "server.workers: expected a number of processes"),
        ('[server]\nworkers = "many"', "server.workers: expected a number of processes"),
        (
            '[server]\ntrusted_proxies = ["10.0.0.0/33"]',
            "server.trusted_proxies[0]: expected a network",
        ),
        (
            "[server]\ntrusted_proxies = [10]",
            "server.trusted_proxies[0]: expected a string, got an integer (10)",
        ),
        ('[server]\nadmin_listen = "9901"', "server.admin_listen: expected 'host:port'"),
        ('[server]\naccess_log = "xml"', 'server.access_log: expected "text" | "json" | "off"'),
        ('[server]\nloop = "trio"', 'server.loop: expected "uvloop" | "asyncio"'),
        (
            "[server]\nhandshake_timeout = 0",
            "server.handshake_timeout: expected a positive number of seconds",
        ),
        (
            "[server]\nkeepalive_timeout = -1.5",
            "server.keepalive_timeout: expected a positive number",
        ),
        (
            "[server]\nupstream_timeout = true",
            "server.upstream_timeout: expected a positive number",
        ),
        ("[server]\nshutdown_timeout = inf", "server.shutdown_timeout: expected a positive number"),
        (
            '[server]\nupstream_connect_timeout = "5s"',
            "server.upstream_connect_timeout: expected a positive",
        ),
        ("server = 1", "server: expected a table, got an integer (1)"),
        ('[tls]\nstorage = ""', "tls.storage: must not be empty"),
        ('[tls]\nissuer = "letsencrypt"', 'tls.issuer: expected "acme" | "internal"'),
        ('[acme]\ndirectory = "http://ca.example/dir"', "acme.directory: expected an https:// URL"),
        ('[acme]\ndirectory = "acme.example"', "acme.directory: expected an https:// URL"),
        ('[acme]\nemail = "ops"', "acme.email: expected an address such as 'ops@example.com'"),
        ('[acme]\nemail = "a@b@c"', "acme.email: expected an address"),
        ("[acme]\nca_bundle = false", "acme.ca_bundle: expected a string, got a boolean (false)"),
    ],
)
def test_a_bad_value_is_named_by_its_key(toml: str, expected: str) -> None:
    found = problems(toml + "\n" + MINIMAL)
    assert len(found) == 1
    assert found[0].startswith(expected)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"hosts": []}, "sites[0].hosts: at least one host is needed"),
        ({"hosts": "a.example"}, "sites[0].hosts: expected a list, got a string"),
        (
            {"hosts": ["ok.example", "192.0.2.1"]},
            "sites[0].hosts[1]: '192.0.2.1' is an IP address; IP addresses are not allowed",
        ),
        ({"hosts": ["::1"]}, "sites[0].hosts[0]: '::1' is an IP address"),
        ({"hosts": ["[::1]"]}, "sites[0].hosts[0]: '[::1]' is an IP address"),
        ({"hosts": ["a..example"]}, "sites[0].hosts[0]: 'a..example': label ''"),
        ({"hosts": ["-a.example"]}, "sites[0].hosts[0]: '-a.example': label '-a' must be"),
        ({"hosts": ["a-.example"]}, "sites[0].hosts[0]: 'a-.example': label 'a-' must be"),
        ({"hosts": ["a_b.example"]}, "sites[0].hosts[0]: 'a_b.example': label 'a_b' must be"),
        ({"hosts": ["x" * 64 + ".example"]}, "sites[0].hosts[0]: 'xxxx"),
        ({"hosts": [("a" * 63 + ".") * 4 + "example"]}, "sites[0].hosts[0]: 'aaaa"),
        (
            {"hosts": ["*.example"]},
            "sites[0].hosts[0]: '*.example': a wildcard needs two more labels",
        ),
        (
            {"hosts": ["a.*.example.com"]},
            "sites[0].hosts[0]: 'a.*.example.com': '*' is allowed only",
        ),
        (
            {"hosts": ["*foo.example.com"]},
            "sites[0].hosts[0]: '*foo.example.com': '*' is allowed only",
        ),
        (
            {"hosts": ["example.com:443"]},
            "sites[0].hosts[0]: 'example.com:443': give the name only",
        ),
        (
            {"hosts": ["https://example.com"]},
            "sites[0].hosts[0]: 'https://example.com': give the name",
        ),
        ({"hosts": ["bücher.example"]}, "sites[0].hosts[0]: 'bücher.example': write international"),
        ({"upstreams": []}, "sites[0].upstreams: at least one upstream is needed"),
        (
            {"upstreams": ["https://127.0.0.1:8443"]},
            "sites[0].upstreams[0]: 'https://127.0.0.1:8443': only http:// upstreams are supported",
        ),
        (
            {"upstreams": ["127.0.0.1:8000"]},
            "sites[0].upstreams[0]: expected a URL such as 'http://127.0.0.1:8000'",
        ),
        ({"upstreams": ["http://"]}, "sites[0].upstreams[0]: expected a URL such as"),
        ({"upstreams": ["http://a b"]}, "sites[0].upstreams[0]: expected a URL such as"),
        (
            {"upstreams": ["http://app/api"]},
            "sites[0].upstreams[0]: 'http://app/api': no path, query or fragment",
        ),
        (
            {"upstreams": ["http://app/?x=1"]},
            "sites[0].upstreams[0]: 'http://app/?x=1': no path, query",
        ),
        (
            {"upstreams": ["http://app#top"]},
            "sites[0].upstreams[0]: 'http://app#top': no path, query",
        ),
        (
            {"upstreams": ["http://u:p@app"]},
            "sites[0].upstreams[0]: 'http://u:p@app': user:password@",
        ),
        (
            {"upstreams": ["http://app:0"]},
            "sites[0].upstreams[0]: 'http://app:0': port 0 is out of range",
        ),
        (
            {"upstreams": ["http://app:65536"]},
            "sites[0].upstreams[0]: 'http://app:65536' is not a valid URL",
        ),
        (
            {"upstreams": ["http://[::1:80"]},
            "sites[0].upstreams[0]: 'http://[::1:80' is not a valid URL",
        ),
        ({"cert": "/c.pem"}, "sites[0].key: missing: cert is set, give both or neither"),
        ({"key": "/k.pem"}, "sites[0].cert: missing: key is set, give both or neither"),
        ({"cert": "", "key": "/k.pem"}, "sites[0].cert: must not be empty"),
        ({"hsts": ""}, "sites[0].hsts: must not be empty"),
        ({"hsts": "max-age=1\r\nX-Evil: 1"}, "sites[0].hsts: must be printable ASCII on one line"),
        ({"routes": {"path": "/api"}}, "sites[0].routes: expected a list, got a table"),
        (
            {"routes": [{"path": "api", "upstreams": ["http://a"]}]},
            "sites[0].routes[0].path: expected a path prefix such as '/api'",
        ),
        ({"routes": [{"upstreams": ["http://a"]}]}, "sites[0].routes[0].path: required"),
        ({"routes": [{"path": "/a"}]}, "sites[0].routes[0].upstreams: required"),
        (
            {"routes": [{"path": "/a", "upstreams": ["https://a"]}]},
            "sites[0].routes[0].upstreams[0]: 'https://a': only http://",
        ),
        (
            {"routes": [{"path": "/a", "upstreams": ["http://a"], "strip": True}]},
            "sites[0].routes[0]: unknown key 'strip' (allowed: path, upstreams)",
        ),
        (
            {"tls": "internal"},
            "sites[0]: unknown key 'tls' "
            "(allowed: hosts, upstreams, routes, cert, key, hsts, on_demand)",
        ),
    ],
)
def test_a_bad_site_value_is_named_by_its_key(keys: dict[str, object], expected: str) -> None:
    found = site_problems(**keys)
    assert len(found) == 1
    assert found[0].startswith(expected)


def test_duplicate_route_paths_are_refused() -> None:
    routes = [
        {"path": "/api", "upstreams": ["http://a"]},
        {"path": "/web", "upstreams": ["http://b"]},
        {"path": "/api", "upstreams": ["http://c"]},
    ]
    assert site_problems(routes=routes) == ["sites[0].routes[2].path: '/api' is also routes[0]"]


def test_a_site_with_routes_still_needs_fallback_upstreams() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "sites": [
                    {"hosts": ["a.example"], "routes": [{"path": "/", "upstreams": ["http://a"]}]}
                ]
            }
        )
    assert caught.value.problems == [
        "sites[0].upstreams: required: where requests go (the fallback for paths no route matches)"
    ]


def test_missing_or_empty_sites_are_refused() -> None:
    assert problems("") == ["sites: at least one site is needed"]
    assert problems("sites = []") == ["sites: at least one site is needed"]
    assert problems("[[sites]]") == [
        "sites[0].hosts: required: the names this site answers to",
        "sites[0].upstreams: required: where requests go (the fallback for paths no route matches)",
    ]
    assert problems("sites = [1]") == ["sites[0]: expected a table, got an integer (1)"]


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    found = problems(
        "colour = 'blue'\n[server]\nhttps_listens = []\n[tls]\nstorge = 'x'\n[acme]\nfoo = 1\n"
        + MINIMAL
    )
    assert len(found) == 4
    assert found[0] == "unknown key 'colour' (allowed: sites, server, tls, acme, docker)"
    assert found[1].startswith(
        "server: unknown key 'https_listens' (allowed: https_listen, http_listen, https_port, "
    )
    assert "shutdown_timeout" in found[1]
    assert found[2] == "tls: unknown key 'storge' (allowed: storage, issuer, on_demand)"
    assert found[3].startswith("acme: unknown key 'foo' (allowed: directory, email, ca_bundle")


def test_all_problems_are_reported_together_in_file_order() -> None:
    found = problems(
        """
        [server]
        https_listen = ["0.0.0.0:443", "nowhere"]
        https_port = true
        [tls]
        issuer = "self"
        [[sites]]
        hosts = ["a.example"]
        upstreams = ["http://127.0.0.1:8000"]
        [[sites]]
        hosts = ["b.example", "10.0.0.1"]
        upstreams = ["http://127.0.0.1:8000", "https://127.0.0.1:8443"]
        """
    )
    assert [problem.split(":")[0] for problem in found] == [
        "server.https_listen[1]",
        "server.https_port",
        "tls.issuer",
        "sites[1].hosts[1]",
        "sites[1].upstreams[1]",
    ]
    error = ConfigError(found)
    assert str(error) == "\n".join(found)
    assert pickle.loads(pickle.dumps(error)).problems == found


def test_a_host_in_two_sites_names_both() -> None:
    found = problems(
        """
        [[sites]]
        hosts = ["api.example.com", "www.example.com"]
        upstreams = ["http://a"]
        [[sites]]
        hosts = ["other.example.com"]
        upstreams = ["http://b"]
        [[sites]]
        hosts = ["WWW.Example.com.", "x.example.com", "x.example.com"]
        upstreams = ["http://c"]
        """
    )
    assert found == [
        "sites[2].hosts[0]: 'www.example.com' is already in sites[0]",
        "sites[2].hosts[2]: 'x.example.com' is already in this site",
    ]


def test_a_duplicate_host_is_found_even_when_its_site_has_other_problems() -> None:
    found = problems(
        """
        [[sites]]
        hosts = ["a.example"]
        upstreams = ["http://a"]
        [[sites]]
        hosts = ["bad host", "a.example"]
        upstreams = ["ftp://b"]
        """
    )
    assert [problem.split(":")[0] for problem in found] == [
        "sites[1].hosts[0]",
        "sites[1].upstreams[0]",
        "sites[1].hosts[1]",
    ]
    assert found[-1] == "sites[1].hosts[1]: 'a.example' is already in sites[0]"


def test_ipv6_listen_addresses_and_upstreams() -> None:
    config = parse_config(
        {
            "server": {
                "https_listen": ["[::]:443", "[2001:db8::1]:8443"],
                "http_listen": ["[::1]:80"],
                "admin_listen": "[::1]:9901",
            },
            "sites": [site(upstreams=["http://[2001:db8::2]:8000", "http://[::1]"])],
        }
    )
    assert config.server.https_listen == (Address("::", 443), Address("2001:db8::1", 8443))
    assert [str(a) for a in config.server.http_listen] == ["[::1]:80"]
    assert config.server.admin_listen == Address("::1", 9901)
    assert config.sites[0].upstreams == (Upstream("2001:db8::2", 8000), Upstream("::1", 80))


def test_helpers_for_command_line_values() -> None:
    assert parse_address("[::]:8443") == Address("::", 8443)
    assert parse_address("localhost:8080") == Address("localhost", 8080)
    assert parse_upstream("http://127.0.0.1:8000") == Upstream("127.0.0.1", 8000)
    assert parse_host("*.Apps.Example.com") == "*.apps.example.com"
    with pytest.raises(ConfigError, match=r"^--https-listen: expected 'host:port'"):
        parse_address("443", "--https-listen")
    with pytest.raises(ConfigError, match=r"^--to: 'https://a': only http://"):
        parse_upstream("https://a", "--to")


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tlsproxy.toml"
    path.write_text(CONTRACT_EXAMPLE)
    assert load_config(path) == parse_config(tomllib.loads(CONTRACT_EXAMPLE))
    assert load_config(str(path)).acme.email == "ops@example.com"


def test_load_config_names_the_file_when_it_cannot_be_used(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.problems == [f"{missing}: no such file"]

    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nhttps_port = 443\n")
    with pytest.raises(ConfigError) as caught:
        load_config(broken)
    (message,) = caught.value.problems
    assert message.startswith(f"{broken}: not valid TOML: ")
    assert "line 1" in message

    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path)  # a directory

    bad = tmp_path / "bad.toml"
    bad.write_text("[tls]\nissuer = 'x'\n" + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert caught.value.problems[0].startswith("tls.issuer: ")


def test_start_problems_name_what_is_not_available_yet() -> None:
    config = parse_config(
        {
            "server": {"workers": "auto"},
            "tls": {"storage": "memcached://cache:11211"},
            "sites": [site(hosts=["a.example"]), site(hosts=["b.example"], cert="c", key="k")],
        }
    )
    assert start_problems(config) == [
        "tls.storage: memcached:// storage is not available yet; "
        "use a directory path or a redis:// URL",
    ]
    redis = parse_config({"tls": {"storage": "redis://cache:6379/0"}, "sites": [site()]})
    assert start_problems(redis) == []
    workers_4 = parse_config({"server": {"workers": 4}, "sites": [site()]})
    assert start_problems(workers_4) == []


def test_start_problems_accept_what_this_version_runs() -> None:
    internal = parse_config({"tls": {"issuer": "internal"}, "sites": [site(), site(hosts=["b.x"])]})
    assert start_problems(internal) == []
    files = parse_config({"sites": [site(cert="/c.pem", key="/k.pem")]})
    assert start_problems(files) == []
    assert start_problems(Config(sites=())) == ["sites: at least one site is needed"]


# --- Properties -----------------------------------------------------------------------------

LABEL = st.text(string.ascii_letters + string.digits, min_size=1, max_size=20)
# the last label is never all digits, so a generated name can never be an IP address
TLD = st.text(string.ascii_letters, min_size=1, max_size=10)
HOST = st.builds(
    lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, min_size=1, max_size=3), TLD
)
HOSTS = st.lists(HOST, min_size=1, max_size=5, unique_by=str.lower)


@settings(database=None)
@given(hosts=HOSTS, wildcard=st.booleans(), trailing_dot=st.booleans())
def test_valid_hosts_round_trip_lower_cased(
    hosts: list[str], wildcard: bool, trailing_dot: bool
) -> None:
    written = [("*." if wildcard else "") + host + ("." if trailing_dot else "") for host in hosts]
    config = parse_config({"sites": [site(hosts=written)]})
    assert config.sites[0].hosts == tuple(("*." if wildcard else "") + h.lower() for h in hosts)


SCALARS = (
    st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", "auto", "0.0.0.0:443", "[::]:443", "http://a", "https://a", "*.a.b"])
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def table_of(keys: list[str]) -> st.SearchStrategy[dict[str, object]]:
    return st.dictionaries(st.sampled_from([*keys, "junk"]), JUNK, max_size=4)


SITE_KEYS = ["hosts", "upstreams", "routes", "cert", "key", "hsts"]
FILES = st.fixed_dictionaries(
    {"sites": st.lists(table_of(SITE_KEYS), max_size=3) | JUNK},
    optional={
        "server": table_of(list(ServerConfig.__dataclass_fields__)) | JUNK,
        "tls": table_of(["storage", "issuer"]) | JUNK,
        "acme": table_of(["directory", "email", "ca_bundle"]) | JUNK,
        "other": JUNK,
    },
)


@settings(database=None, max_examples=300)
@given(data=FILES)
def test_junk_gives_config_error_naming_a_key_and_nothing_else(data: dict[str, object]) -> None:
    try:
        config = parse_config(data)
    except ConfigError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.split(":")[0].split(".")[0].split("[")[0] in {
                "server",
                "tls",
                "acme",
                "sites",
                "unknown key 'other' (allowed",
            }
    else:
        assert isinstance(config, Config)
        assert config.sites
