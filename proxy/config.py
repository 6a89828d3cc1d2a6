"""The typed, frozen configuration of a proxy, and the TOML loader that builds it.

Every problem is reported with the key that caused it (``sites[1].upstreams[0]: ...``),
all at once, so a user fixes a file in one go.

How the loader works: each value is read by a *converter*, a function that returns the typed
value or raises ``_Invalid``. Converters for lists and tables catch their items' complaints,
tag each with the rest of its key path (``[2]``, ``.upstreams[0]``) and raise them together,
so one pass over the file collects every problem; ``parse_config`` turns them into a
``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from acme_client.location import StorageLocation, parse_location
from acme_client.rfc2136 import ALGORITHMS as TSIG_ALGORITHMS

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True, slots=True)
class Address:
    """A listen address; ``host`` is an IP literal or name without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """One origin server, reached over plain HTTP/1.1."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path starts with ``path`` go to ``upstreams`` (longest prefix wins)."""

    path: str
    upstreams: tuple[Upstream, ...]


@dataclass(frozen=True, slots=True)
class Site:
    """One ``[[sites]]`` table: the ``hosts`` it answers to (lower-case; ``*.example.com``
    matches one label), its ``upstreams``, optional path-prefix ``routes``, optional
    ``cert``/``key`` files (hot-reloaded on change) and an optional ``hsts`` header value."""

    hosts: tuple[str, ...]  # lower-case; "*.example.com" matches one label
    upstreams: tuple[Upstream, ...]
    routes: tuple[Route, ...] = ()  # optional path-prefix routes tried before `upstreams`
    cert: str | None = None  # PEM chain file; with `key`, overrides [tls].issuer
    key: str | None = None
    hsts: str | None = None  # Strict-Transport-Security value added to responses
    on_demand: bool = False  # certificates at the first handshake for names `hosts` matches

    @property
    def name(self) -> str:
        """The name logs use for the site: its first host."""
        return self.hosts[0]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The ``[server]`` table: listeners, redirects, trust, admin, logs, timeouts and limits."""

    https_listen: tuple[Address, ...] = (Address("0.0.0.0", 443),)
    http_listen: tuple[Address, ...] = (Address("0.0.0.0", 80),)
    https_port: int = 443
    workers: int | Literal["auto"] = 1
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_protocol: tuple[IPNetwork, ...] = ()  # balancers that send a PROXY v1/v2 header first
    admin_listen: Address | None = Address("127.0.0.1", 9901)
    admin_token: str = ""  # bearer token for the admin listener; required off loopback
    access_log: Literal["text", "json", "off"] = "text"
    loop: Literal["uvloop", "asyncio"] = "uvloop"
    handshake_timeout: float = 10.0  # seconds for a client's TLS handshake
    keepalive_timeout: float = 75.0  # idle client connection between requests
    upstream_connect_timeout: float = 5.0  # -> 504 when it runs out
    upstream_timeout: float = 60.0  # upstream silent this long while we wait -> 504
    shutdown_timeout: float = 30.0  # how long SIGTERM waits for in-flight requests
    request_head_timeout: float = 10.0  # the whole request head must arrive within this -> 408
    request_body_timeout: float = 60.0  # longest pause between request body bytes -> 408
    websocket_idle_timeout: float = 600.0  # a WebSocket tunnel with no traffic is closed
    send_timeout: float = 60.0  # a client that reads nothing this long is cut off, both sides
    http2: bool = True  # ALPN offers h2 (then http/1.1); False: http/1.1 only
    max_header_bytes: int = 32 * 1024  # request line + headers; more -> 431
    max_headers: int = 100  # header fields in one request; more -> 431
    max_body_bytes: int = 0  # request body limit (0 = none); more -> 413
    max_connections: int = 10_000  # open client connections; more are refused at accept
    unknown_sni: Literal["default", "reject"] = "default"  # reject: unrecognized_name alert


@dataclass(frozen=True, slots=True)
class OnDemandConfig:
    """``[tls.on_demand]``: who decides which names get a certificate at their first
    handshake (``GET ask?domain=NAME``, 2xx = yes)."""

    ask: str


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The ``[tls]`` table: ``storage`` (certificates, keys, account, internal CA) and the
    ``issuer`` for sites without cert/key files."""

    storage: str = "./tlsproxy-data"
    issuer: Literal["acme", "internal"] = "acme"
    on_demand: OnDemandConfig | None = None  # needed by sites with on_demand = true
    location: StorageLocation = field(init=False, repr=False, compare=False)  # storage, parsed

    def __post_init__(self) -> None:
        object.__setattr__(self, "location", parse_location(self.storage))


CHALLENGES = ("http-01", "dns-01", "tls-alpn-01")


@dataclass(frozen=True, slots=True)
class DNSConfig:
    """The ``[acme.dns]`` table: how DNS-01 puts its TXT records into DNS.

    ``provider = "rfc2136"``: dynamic updates to ``server``, signed with the TSIG key
    ``tsig_key`` (its secret in ``tsig_secret`` or the file ``tsig_secret_file``).
    ``provider = "exec"``: ``command`` is run as ``command present|cleanup FQDN VALUE``.
    """

    provider: Literal["rfc2136", "exec"] = "rfc2136"
    server: Address | None = None  # rfc2136: the primary nameserver taking updates
    tsig_key: str = ""
    tsig_algorithm: str = "hmac-sha256"
    tsig_secret: str = field(default="", repr=False)  # never in logs or status
    tsig_secret_file: str = ""
    command: tuple[str, ...] = ()  # exec: the program and its first arguments
    zone: str = ""  # "" = the zone the SOA names
    propagation_timeout: float = 120.0  # seconds for every authoritative server to serve it
    resolvers: tuple[Address, ...] = ()  # asked for SOA, NS and CNAME; () = the system's


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One ``[[acme.issuers]]`` table: a CA to ask, in the order of the list."""

    directory: str
    email: str = ""  # "" = [acme] email
    ca_bundle: str = ""
    eab_kid: str = ""
    eab_hmac_key: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class ACMEConfig:
    """The ``[acme]`` table: the CA's directory URL, the account contact, extra trust for
    the CA's API, optional External Account Binding, the challenge types in order of
    preference and, for DNS-01, ``[acme.dns]``."""

    directory: str = LETS_ENCRYPT
    email: str = ""
    ca_bundle: str = ""  # CA file trusted for the ACME server's own HTTPS API (Pebble, private CAs)
    eab_kid: str = ""  # External Account Binding key id, for CAs that require one
    eab_hmac_key: str = ""  # ... and its base64url HMAC key
    challenges: tuple[str, ...] = ("http-01", "tls-alpn-01")  # in order of preference
    dns: DNSConfig | None = None  # [acme.dns]: needed by "dns-01"
    issuers: tuple[IssuerConfig, ...] = ()  # tried in order; replaces directory when given

    @property
    def cas(self) -> tuple[IssuerConfig, ...]:
        """The CAs to ask, in order: ``issuers``, or the one that ``directory`` names."""
        if self.issuers:
            return tuple(dataclasses.replace(i, email=i.email or self.email) for i in self.issuers)
        return (
            IssuerConfig(
                self.directory, self.email, self.ca_bundle, self.eab_kid, self.eab_hmac_key
            ),
        )


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """The ``[docker]`` table: sites discovered from the labels of running containers, read
    from the Docker Engine API at ``endpoint`` (``unix://`` or ``tcp://``; ``tls_*`` files
    for a TLS ``tcp://`` endpoint)."""

    endpoint: str = "unix:///var/run/docker.sock"
    label_prefix: str = "tlsproxy"  # labels <prefix>.enable, .hosts, .port, .hsts
    network: str = ""  # the container network whose address is used; "" = the only one
    exposed_by_default: bool = False  # True: every container with hosts, unless enable=false
    tls_ca: str = ""  # CA file that signed the daemon's certificate (tcp:// with TLS)
    tls_cert: str = ""  # client certificate and key the daemon asks for
    tls_key: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    """A whole proxy configuration. Frozen; build it in code, or from TOML with
    :func:`load_config` / :func:`parse_config`, which validate every key and name it.
    With ``docker`` set, ``sites`` may be empty: sites come from container labels too."""

    sites: tuple[Site, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    acme: ACMEConfig = field(default_factory=ACMEConfig)
    docker: DockerConfig | None = None  # [docker]: discovery from container labels


# --- Public API ------------------------------------------------------------------------------

NO_SITES = "at least one site is needed"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` has one line per problem, each naming
    its key (``sites[1].upstreams[0]: ...``)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(list(problems))  # args stay picklable
        self.problems: list[str] = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a TOML file and parse it; an unreadable or malformed file is a ConfigError too, so
    callers (``run``, ``check``) have a single error to report."""
    return parse_config(read_toml(path))


def read_toml(path: str | os.PathLike[str]) -> dict[str, object]:
    """The parsed TOML file, or a ConfigError naming the file and what is wrong with it."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError([f"{name}: no such file"]) from None
    except OSError as error:
        raise ConfigError([f"{name}: cannot read it: {error.strerror or error}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError([f"{name}: not valid TOML: {error}"]) from None


def parse_config(data: Mapping[str, object]) -> Config:
    """Build a Config from already-parsed TOML, or raise one ConfigError listing every problem."""
    return _parse(_config, data, "")


def parse_address(text: str, key: str = "address") -> Address:
    """Parse ``host:port`` (``[::]:443`` for IPv6), e.g. for ``--https-listen``; problems are
    reported under ``key``."""
    return _parse(_address, text, key)


def parse_upstream(text: str, key: str = "upstream") -> Upstream:
    """Parse an upstream URL such as ``http://127.0.0.1:8000``, e.g. for ``--to``."""
    return _parse(_upstream, text, key)


def parse_site(data: Mapping[str, object], key: str = "site") -> Site:
    """Parse one ``[[sites]]`` table (from container labels, say); problems under ``key``."""
    return _parse(_site, data, key)


def parse_host(text: str, key: str = "host") -> str:
    """Parse a site's host name (``*.example.com`` allowed), e.g. for ``--from``; lower-cased."""
    return _parse(_host, text, key)


def start_problems(config: Config) -> list[str]:
    """What the schema accepts but this version cannot run, so ``check`` and ``run`` can
    refuse it up front instead of failing later. Judged from the configuration alone; what
    it names on disk is :mod:`proxy.preflight`'s."""
    problems: list[str] = []
    if not config.sites and config.docker is None:
        problems.append(f"sites: {NO_SITES}")
    location = config.tls.location
    if storage := location.problem():
        problems.append(f"tls.storage: {storage}")
    elif (
        location.directory is None
        and config.tls.issuer == "internal"
        and any(site.cert is None and site.key is None for site in config.sites)
    ):
        problems.append(
            'tls.issuer: "internal" keeps its CA and certificates in a directory, and '
            f"tls.storage is {config.tls.storage!r}: give tls.storage a directory, or give "
            "every site cert and key files"
        )
    problems += _acme_problems(config)
    problems += _on_demand_problems(config)
    admin = config.server.admin_listen
    if admin is not None and not _loopback(admin.host) and not config.server.admin_token:
        problems.append(
            f"server.admin_listen: {admin} is not a loopback address, and the status page and "
            "/metrics must not be open to a network: set server.admin_token (or "
            "TLSPROXY_ADMIN_TOKEN), or listen on 127.0.0.1"
        )
    return problems


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _acme_problems(config: Config) -> list[str]:
    """DNS-01 and its table come together; only DNS-01 can prove a wildcard name."""
    acme = config.acme
    problems: list[str] = []
    if "dns-01" in acme.challenges and acme.dns is None:
        problems.append('acme.challenges: "dns-01" needs an [acme.dns] table (provider, ...)')
    if acme.dns is not None and "dns-01" not in acme.challenges:
        problems.append(
            'acme.dns: configured, but acme.challenges does not list "dns-01" '
            '(e.g. challenges = ["dns-01"])'
        )
    if config.tls.issuer != "acme":
        return problems
    acme_sites = [
        (index, site)
        for index, site in enumerate(config.sites)
        if site.cert is None and site.key is None
    ]
    for index, site in acme_sites:
        if site.on_demand:
            continue  # its hosts are patterns: each name gets a certificate of its own
        for position, host in enumerate(site.hosts):
            if host.startswith("*.") and "dns-01" not in acme.challenges:
                problems.append(
                    f"sites[{index}].hosts[{position}]: {host!r}: a wildcard certificate needs "
                    'the dns-01 challenge: add "dns-01" to acme.challenges and configure '
                    "[acme.dns] (or give this site cert and key files)"
                )
    for key, issuer in _issuer_keys(acme):
        bundle = issuer.ca_bundle
        if acme_sites and bundle and not os.path.isfile(bundle):
            problems.append(f"{key}.ca_bundle: {bundle!r}: no such file")
    return problems


def _on_demand_problems(config: Config) -> list[str]:
    """On-demand sites get ACME certificates, and someone must say which names may have one."""
    problems = []
    for index, site in enumerate(config.sites):
        if not site.on_demand:
            continue
        if config.tls.on_demand is None:
            problems.append(
                f"sites[{index}].on_demand: needs [tls.on_demand] ask = URL (which names may "
                "get a certificate; without it anyone could make us order for any name)"
            )
        if config.tls.issuer != "acme" or site.cert is not None or site.key is not None:
            problems.append(
                f'sites[{index}].on_demand: certificates come from ACME: issuer = "acme" in '
                "[tls], and no cert/key files on this site"
            )
    return problems


def _issuer_keys(acme: ACMEConfig) -> list[tuple[str, IssuerConfig]]:
    """Each CA with the key its settings are under: ``acme`` or ``acme.issuers[N]``."""
    if not acme.issuers:
        return [("acme", acme.cas[0])]
    return [(f"acme.issuers[{n}]", issuer) for n, issuer in enumerate(acme.cas)]


# --- The converter machinery -----------------------------------------------------------------

T = TypeVar("T")
Found = tuple[str, str]  # (key path below the converted value, e.g. ".upstreams[0]"; message)


class _Invalid(Exception):
    """A converter's complaints, each with the key path below the value it was given."""

    def __init__(self, *found: Found) -> None:
        super().__init__(*found)
        self.found = found

    def under(self, prefix: str) -> list[Found]:
        return [(prefix + path, message) for path, message in self.found]


def _bad(message: str) -> _Invalid:
    """A complaint about the value itself (no deeper key)."""
    return _Invalid(("", message))


def _parse(convert: Callable[[object], T], value: object, key: str) -> T:
    """Run a converter and turn its complaints into user-facing ``key.path: message`` lines."""
    try:
        return convert(value)
    except _Invalid as invalid:
        problems = []
        for path, message in invalid.under(key):
            path = path.removeprefix(".")
            problems.append(f"{path}: {message}" if path else message)
        raise ConfigError(problems) from None


class _Table:
    """Reads one TOML table: unknown keys and bad values are collected, raised by done()."""

    def __init__(self, value: object, allowed: Sequence[str]) -> None:
        if not isinstance(value, Mapping):
            raise _bad(f"expected a table, got {_describe(value)}")
        self.data: Mapping[str, object] = value
        self.found: list[Found] = [
            ("", f"unknown key {key!r} (allowed: {', '.join(allowed)})")
            for key in value
            if key not in allowed
        ]

    def get(self, key: str, convert: Callable[[object], T], default: T, *, missing: str = "") -> T:
        """``key``'s converted value, or ``default`` when absent or bad (the problem is noted).
        A non-empty ``missing`` makes the key required and is the message when it is absent."""
        if key not in self.data:
            if missing:
                self.found.append((f".{key}", missing))
            return default
        try:
            return convert(self.data[key])
        except _Invalid as invalid:
            self.found += invalid.under(f".{key}")
            return default

    def done(self) -> None:
        if self.found:
            raise _Invalid(*self.found)


def _keys(cls: type) -> tuple[str, ...]:
    """A dataclass's field names: the TOML keys of its table, so the two cannot drift apart.
    Fields computed from the others (``init=False``) are not keys."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _items(value: object, empty: str = "") -> Sequence[object]:
    """A TOML array; a non-empty ``empty`` refuses an empty one with that message."""
    if not isinstance(value, list | tuple):
        raise _bad(f"expected a list, got {_describe(value)}")
    if empty and not value:
        raise _bad(empty)
    return value


def _list_of(convert: Callable[[object], T], empty: str = "") -> Callable[[object], tuple[T, ...]]:
    """A converter for a list whose items ``convert`` reads; bad items are named by index."""

    def convert_list(value: object) -> tuple[T, ...]:
        items: list[T] = []
        found: list[Found] = []
        for index, item in enumerate(_items(value, empty)):
            try:
                items.append(convert(item))
            except _Invalid as invalid:
                found += invalid.under(f"[{index}]")
        if found:
            raise _Invalid(*found)
        return tuple(items)

    return convert_list


def _describe(value: object) -> str:
    """How a wrong value is shown back to the user: its TOML type and (shortened) value."""
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "a boolean"),  # before int: bool is an int subclass
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        ((list, tuple), "a list"),
        (Mapping, "a table"),
    )
    kind = next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)
    shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML spells it
    return f"{kind} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


# --- Scalar converters -----------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a machine name to bind to or connect to
_LOCAL = frozenset({"localhost", "127.0.0.1", "::1"})


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _bad(f"expected a string, got {_describe(value)}")
    return value


def _nonempty(value: object) -> str:
    text = _string(value)
    if not text:
        raise _bad("must not be empty")
    return text


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"expected true or false, got {_describe(value)}")
    return value


def _one_of(*choices: T) -> Callable[[object], T]:
    """A converter accepting exactly one of the string ``choices``."""

    def convert(value: object) -> T:
        for choice in choices:
            if isinstance(value, str) and value == choice:
                return choice
        allowed = " | ".join(f'"{choice}"' for choice in choices)
        raise _bad(f"expected {allowed}, got {_describe(value)}")

    return convert


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"expected a port number (1-65535), got {_describe(value)}")
    if not 1 <= value <= 65535:
        raise _bad(f"port {value} is out of range (1-65535)")
    return value


def _workers(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise _bad(f'expected a number of processes (1 or more) or "auto", got {_describe(value)}')


def _seconds(value: object) -> float:
    """A duration: a positive, finite int or float (``true`` is not 1 second)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(min(value, math.inf))  # min() keeps huge ints from overflowing float()
        if 0 < seconds < math.inf:
            return seconds
    raise _bad(f"expected a positive number of seconds, got {_describe(value)}")


def _count(minimum: int) -> Callable[[object], int]:
    """A whole number of at least ``minimum`` (bytes, headers, connections)."""

    def convert(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise _bad(f"expected a whole number of at least {minimum}, got {_describe(value)}")

    return convert


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _address(value: object) -> Address:
    """A listen address ``host:port``; IPv6 goes in brackets (``[::]:443``)."""
    text = _string(value)
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid_host = ":" in host and _is_ip(host)
    else:
        valid_host = ":" not in host and (_is_ip(host) or bool(_NAME.fullmatch(host)))
    if not (colon and valid_host and port.isascii() and port.isdigit() and len(port) <= 5):
        raise _bad(f"expected 'host:port' such as '0.0.0.0:443' or '[::]:443', got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise _bad(f"{text!r}: port {int(port)} is out of range (1-65535)")
    return Address(host, int(port))


def _address_or_off(value: object) -> Address | None:
    return None if value == "" else _address(value)


def _network(value: object) -> IPNetwork:
    """A trusted proxy range; a bare address means just that address (/32 or /128)."""
    text = _string(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _bad(f"expected a network such as '10.0.0.0/8' or an address, got {text!r}") from None


def _host(value: object) -> str:
    """A DNS name a site answers to, as SNI carries it: lower case, no trailing dot."""
    text = _string(value)
    name = text.lower().removesuffix(".")
    if _is_ip(name.strip("[]")):
        raise _bad(f"{text!r} is an IP address; IP addresses are not allowed, use a DNS name")
    if not name.isascii():
        raise _bad(f"{text!r}: write international names in their ASCII form (xn--...)")
    if ":" in name or "/" in name:
        raise _bad(f"{text!r}: give the name only, without scheme, port or path")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise _bad(f"{text!r}: a wildcard needs two more labels, as in '*.example.com'")
    if "*" in name.removeprefix("*."):
        raise _bad(f"{text!r}: '*' is allowed only as the whole leftmost label ('*.example.com')")
    if len(name) > 253:
        raise _bad(f"{text!r} is longer than 253 characters")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise _bad(
                f"{text!r}: label {label!r} must be 1-63 letters, digits or '-' (not first or last)"
            )
    return name


def _upstream(value: object) -> Upstream:
    """An origin ``http://host[:port]``; the proxy speaks plain HTTP/1.1 to upstreams."""
    text = _string(value)
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as error:
        raise _bad(f"{text!r} is not a valid URL ({error})") from None
    host = url.hostname or ""
    if url.scheme == "https":
        raise _bad(f"{text!r}: only http:// upstreams are supported")
    if (
        url.scheme != "http"
        or not text.isprintable()
        or " " in text
        or not (_is_ip(host) or _NAME.fullmatch(host))
    ):
        raise _bad(f"expected a URL such as 'http://127.0.0.1:8000', got {text!r}")
    if "@" in url.netloc:
        raise _bad(f"{text!r}: user:password@ is not supported")
    if url.path not in ("", "/") or "?" in text or "#" in text:
        raise _bad(f"{text!r}: no path, query or fragment allowed (requests keep their own path)")
    if port == 0:
        raise _bad(f"{text!r}: port 0 is out of range (1-65535)")
    return Upstream(host, port or 80)


def _header_value(value: object) -> str:
    text = _nonempty(value)
    if not (text.isascii() and text.isprintable()):
        raise _bad("must be printable ASCII on one line (it becomes a header value)")
    return text


def _directory(value: object) -> str:
    """The ACME directory URL; plain http only to a local test server such as Pebble."""
    text = _string(value)
    try:
        url = urlsplit(text)
        host = url.hostname if url.port != 0 else None
    except ValueError:
        host = None
    if host and (url.scheme == "https" or (url.scheme == "http" and host in _LOCAL)):
        return text
    raise _bad(f"expected an https:// URL (http:// only for localhost), got {text!r}")


def _email(value: object) -> str:
    text = _string(value)
    local, _, domain = text.partition("@")
    if text and not (local and domain and "@" not in domain and text.isprintable()):
        raise _bad(f"expected an address such as 'ops@example.com' (or \"\"), got {text!r}")
    return text


def _route_path(value: object) -> str:
    text = _string(value)
    if not (text.startswith("/") and text.isascii() and text.isprintable()) or any(
        char in text for char in " ?#"
    ):
        raise _bad(f"expected a path prefix such as '/api', got {text!r}")
    return text


# --- Tables ----------------------------------------------------------------------------------

_hosts = _list_of(_host, empty="at least one host is needed")
_patterns = _list_of(lambda v: "*" if v == "*" else _host(v), empty="at least one host is needed")
_upstreams = _list_of(_upstream, empty="at least one upstream is needed")


def _server(value: object) -> ServerConfig:
    t, d = _Table(value, _keys(ServerConfig)), ServerConfig()
    server = ServerConfig(
        https_listen=t.get(
            "https_listen", _list_of(_address, "at least one address is needed"), d.https_listen
        ),
        http_listen=t.get("http_listen", _list_of(_address), d.http_listen),
        https_port=t.get("https_port", _port, d.https_port),
        workers=t.get("workers", _workers, d.workers),
        trusted_proxies=t.get("trusted_proxies", _list_of(_network), d.trusted_proxies),
        proxy_protocol=t.get("proxy_protocol", _list_of(_network), d.proxy_protocol),
        admin_listen=t.get("admin_listen", _address_or_off, d.admin_listen),
        admin_token=t.get("admin_token", _string, d.admin_token),
        access_log=t.get("access_log", _one_of("text", "json", "off"), d.access_log),
        loop=t.get("loop", _one_of("uvloop", "asyncio"), d.loop),
        handshake_timeout=t.get("handshake_timeout", _seconds, d.handshake_timeout),
        keepalive_timeout=t.get("keepalive_timeout", _seconds, d.keepalive_timeout),
        upstream_connect_timeout=t.get(
            "upstream_connect_timeout", _seconds, d.upstream_connect_timeout
        ),
        upstream_timeout=t.get("upstream_timeout", _seconds, d.upstream_timeout),
        shutdown_timeout=t.get("shutdown_timeout", _seconds, d.shutdown_timeout),
        request_head_timeout=t.get("request_head_timeout", _seconds, d.request_head_timeout),
        request_body_timeout=t.get("request_body_timeout", _seconds, d.request_body_timeout),
        websocket_idle_timeout=t.get("websocket_idle_timeout", _seconds, d.websocket_idle_timeout),
        send_timeout=t.get("send_timeout", _seconds, d.send_timeout),
        http2=t.get("http2", _boolean, d.http2),
        max_header_bytes=t.get("max_header_bytes", _count(1024), d.max_header_bytes),
        max_headers=t.get("max_headers", _count(1), d.max_headers),
        max_body_bytes=t.get("max_body_bytes", _count(0), d.max_body_bytes),
        max_connections=t.get("max_connections", _count(1), d.max_connections),
        unknown_sni=t.get("unknown_sni", _one_of("default", "reject"), d.unknown_sni),
    )
    t.done()
    return server


def _on_demand(value: object) -> OnDemandConfig:
    t = _Table(value, _keys(OnDemandConfig))
    config = OnDemandConfig(ask=t.get("ask", _ask_url, "", missing="required: the ask URL"))
    t.done()
    return config


def _ask_url(value: object) -> str:
    """The ask endpoint: an http(s) URL without a query (``?domain=NAME`` is appended)."""
    text = _string(value)
    try:
        url = urlsplit(text)
        ok = url.scheme in ("http", "https") and bool(url.hostname) and not url.query
    except ValueError:
        ok = False
    if not ok:
        raise _bad(f"expected a URL such as 'http://127.0.0.1:9000/allowed', got {text!r}")
    return text


def _tls(value: object) -> TLSConfig:
    t, d = _Table(value, _keys(TLSConfig)), TLSConfig()
    tls = TLSConfig(
        storage=t.get("storage", _nonempty, d.storage),
        issuer=t.get("issuer", _one_of("acme", "internal"), d.issuer),
        on_demand=t.get("on_demand", _on_demand, d.on_demand),
    )
    t.done()
    return tls


def _acme(value: object) -> ACMEConfig:
    t, d = _Table(value, _keys(ACMEConfig)), ACMEConfig()
    acme = ACMEConfig(
        directory=t.get("directory", _directory, d.directory),
        email=t.get("email", _email, d.email),
        ca_bundle=t.get("ca_bundle", _string, d.ca_bundle),
        eab_kid=t.get("eab_kid", _string, d.eab_kid),
        eab_hmac_key=t.get("eab_hmac_key", _eab_key, d.eab_hmac_key),
        challenges=t.get("challenges", _challenges, d.challenges),
        dns=t.get("dns", _dns, d.dns),
        issuers=t.get("issuers", _list_of(_issuer, empty="at least one issuer"), d.issuers),
    )
    if t.data.get("issuers"):
        for key in ("directory", "ca_bundle", "eab_kid", "eab_hmac_key"):
            if key in t.data:
                t.found.append(
                    (f".{key}", "not used with [[acme.issuers]]: give it in each issuer")
                )
    for present, absent in (("eab_kid", "eab_hmac_key"), ("eab_hmac_key", "eab_kid")):
        if t.data.get(present) and not t.data.get(absent):
            t.found.append((f".{absent}", f"missing: {present} is set, give both or neither"))
    t.done()
    return acme


def _issuer(value: object) -> IssuerConfig:
    t = _Table(value, _keys(IssuerConfig))
    issuer = IssuerConfig(
        directory=t.get("directory", _directory, "", missing="required: the CA's directory URL"),
        email=t.get("email", _email, ""),
        ca_bundle=t.get("ca_bundle", _string, ""),
        eab_kid=t.get("eab_kid", _string, ""),
        eab_hmac_key=t.get("eab_hmac_key", _eab_key, ""),
    )
    for present, absent in (("eab_kid", "eab_hmac_key"), ("eab_hmac_key", "eab_kid")):
        if t.data.get(present) and not t.data.get(absent):
            t.found.append((f".{absent}", f"missing: {present} is set, give both or neither"))
    t.done()
    return issuer


def _challenges(value: object) -> tuple[str, ...]:
    types = _list_of(_one_of(*CHALLENGES), empty="at least one challenge type is needed")(value)
    if len(set(types)) != len(types):
        raise _bad("each challenge type may be listed once")
    return types


def _dns_server(value: object) -> Address:
    """A DNS server ``host:port``, or a bare IP address (port 53)."""
    text = _string(value)
    if _is_ip(text):
        return Address(text, 53)
    return _address(value)


def _dns(value: object) -> DNSConfig:
    t, d = _Table(value, _keys(DNSConfig)), DNSConfig()
    dns = DNSConfig(
        provider=t.get("provider", _one_of("rfc2136", "exec"), d.provider),
        server=t.get("server", _dns_server, d.server),
        tsig_key=t.get("tsig_key", _string, d.tsig_key),
        tsig_algorithm=t.get("tsig_algorithm", _one_of(*TSIG_ALGORITHMS), d.tsig_algorithm),
        tsig_secret=t.get("tsig_secret", _base64, d.tsig_secret),
        tsig_secret_file=t.get("tsig_secret_file", _string, d.tsig_secret_file),
        command=t.get("command", _list_of(_nonempty), d.command),
        zone=t.get("zone", _string, d.zone),
        propagation_timeout=t.get("propagation_timeout", _seconds, d.propagation_timeout),
        resolvers=t.get("resolvers", _list_of(_dns_server), d.resolvers),
    )
    if dns.provider == "rfc2136":
        for key, present in (("server", dns.server), ("tsig_key", dns.tsig_key)):
            if not present and key not in t.data:
                t.found.append((f".{key}", 'required with provider = "rfc2136"'))
        if bool(dns.tsig_secret) == bool(dns.tsig_secret_file):
            t.found.append((".tsig_secret", "give tsig_secret or tsig_secret_file (one of them)"))
    elif not dns.command and "command" not in t.data:
        t.found.append((".command", 'required with provider = "exec", e.g. ["/path/script"]'))
    t.done()
    return dns


def _base64(value: object) -> str:
    """A secret as base64 (a TSIG secret); the value is never repeated in the message."""
    text = _string(value)
    if text and not re.fullmatch(r"[A-Za-z0-9+/]+=*", text):
        raise _bad("expected base64 (the secret itself is not shown here)")
    return text


def _eab_key(value: object) -> str:
    """The EAB HMAC key as the CA hands it out: base64url, no padding needed."""
    text = _string(value)
    if text and not re.fullmatch(r"[A-Za-z0-9_-]+=*", text):
        raise _bad("expected the base64url HMAC key your CA gave you")
    return text


def _route(value: object) -> Route:
    t = _Table(value, _keys(Route))
    route = Route(
        path=t.get("path", _route_path, "/", missing='required, e.g. path = "/api"'),
        upstreams=t.get("upstreams", _upstreams, (), missing="required: where these requests go"),
    )
    t.done()
    return route


def _routes(value: object) -> tuple[Route, ...]:
    """Path-prefix routes; the same prefix twice would make one of them dead."""
    routes = _list_of(_route)(value)
    first: dict[str, int] = {}
    found: list[Found] = []
    for index, route in enumerate(routes):
        if route.path in first:
            found.append((f"[{index}].path", f"{route.path!r} is also routes[{first[route.path]}]"))
        first.setdefault(route.path, index)
    if found:
        raise _Invalid(*found)
    return routes


def _site(value: object) -> Site:
    t = _Table(value, _keys(Site))
    site = Site(
        hosts=t.get(
            "hosts",
            _patterns if t.data.get("on_demand") is True else _hosts,
            (),
            missing="required: the names this site answers to",
        ),
        upstreams=t.get(
            "upstreams",
            _upstreams,
            (),
            missing="required: where requests go (the fallback for paths no route matches)",
        ),
        routes=t.get("routes", _routes, ()),
        cert=t.get("cert", _nonempty, None),
        key=t.get("key", _nonempty, None),
        hsts=t.get("hsts", _header_value, None),
        on_demand=t.get("on_demand", _boolean, False),
    )
    for present, absent in (("cert", "key"), ("key", "cert")):
        if present in t.data and absent not in t.data:
            t.found.append((f".{absent}", f"missing: {present} is set, give both or neither"))
    t.done()
    return site


def _clashing_hosts(items: Sequence[object]) -> list[Found]:
    """A host claimed twice would make routing and certificates ambiguous. Checked on the raw
    items so that sites with other problems still take part."""
    owner: dict[str, int] = {}
    found: list[Found] = []
    for index, item in enumerate(items):
        hosts = item.get("hosts") if isinstance(item, Mapping) else None
        for position, entry in enumerate(hosts if isinstance(hosts, list | tuple) else ()):
            try:
                host = _host(entry)
            except _Invalid:
                continue  # _site reports it
            if host in owner:
                where = "this site" if owner[host] == index else f"sites[{owner[host]}]"
                found.append((f"[{index}].hosts[{position}]", f"{host!r} is already in {where}"))
            owner.setdefault(host, index)
    return found


def _sites(value: object) -> tuple[Site, ...]:
    items = _items(value, NO_SITES)
    found = _clashing_hosts(items)
    try:
        sites = _list_of(_site)(items)
    except _Invalid as invalid:
        raise _Invalid(*invalid.found, *found) from None
    if found:
        raise _Invalid(*found)
    return sites


_DOCKER_ENDPOINT = re.compile(
    r"unix:///.+|tcp://[A-Za-z0-9_.-]+:[0-9]{1,5}|tcp://\[[0-9a-fA-F:.]+\]:[0-9]{1,5}"
)
_LABEL_PREFIX = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")


def _docker(value: object) -> DockerConfig:
    t, d = _Table(value, _keys(DockerConfig)), DockerConfig()
    docker = DockerConfig(
        endpoint=t.get("endpoint", _docker_endpoint, d.endpoint),
        label_prefix=t.get("label_prefix", _label_prefix, d.label_prefix),
        network=t.get("network", _string, d.network),
        exposed_by_default=t.get("exposed_by_default", _boolean, d.exposed_by_default),
        tls_ca=t.get("tls_ca", _string, d.tls_ca),
        tls_cert=t.get("tls_cert", _string, d.tls_cert),
        tls_key=t.get("tls_key", _string, d.tls_key),
    )
    for present, absent in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if t.data.get(present) and not t.data.get(absent):
            t.found.append((f".{absent}", f"missing: {present} is set, give both or neither"))
    if (docker.tls_ca or docker.tls_cert) and not docker.endpoint.startswith("tcp://"):
        t.found.append((".endpoint", "TLS files are for a tcp:// endpoint"))
    t.done()
    return docker


def _docker_endpoint(value: object) -> str:
    text = _string(value)
    if not _DOCKER_ENDPOINT.fullmatch(text):
        raise _bad("expected 'unix:///var/run/docker.sock' or 'tcp://host:port', got " + repr(text))
    return text


def _label_prefix(value: object) -> str:
    text = _string(value)
    if not _LABEL_PREFIX.fullmatch(text):
        raise _bad(
            f"expected a label prefix such as 'tlsproxy' or 'com.example.proxy', got {text!r}"
        )
    return text


def _sites_or_none(value: object) -> tuple[Site, ...]:
    """With [docker], sites may all come from container labels: an empty list is fine."""
    return _sites(value) if _items(value) else ()


def _config(value: object) -> Config:
    t = _Table(value, _keys(Config))
    server = t.get("server", _server, ServerConfig())
    tls = t.get("tls", _tls, TLSConfig())
    acme = t.get("acme", _acme, ACMEConfig())
    docker = t.get("docker", _docker, None)
    if docker is None and "sites" not in t.data:
        t.found.append((".sites", NO_SITES))
    config = Config(  # read in the order a file usually has, so problems come in that order
        server=server,
        tls=tls,
        acme=acme,
        docker=docker,
        sites=t.get("sites", _sites if docker is None else _sites_or_none, (), missing=""),
    )
    t.done()
    return config
