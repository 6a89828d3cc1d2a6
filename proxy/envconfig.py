"""Environment overrides for the common config keys (``TLSPROXY_HTTPS_LISTEN=...``).

Containers are configured with environment variables; these set the keys of the TOML file
before it is validated, so a bad value is reported under its key just like a bad line in the
file, with the variable named beside it::

    server.https_port (from TLSPROXY_HTTPS_PORT): expected a port number (1-65535), ...

A variable overrides the file's value for that key. Lists are comma-separated
(``TLSPROXY_HTTPS_LISTEN=0.0.0.0:8443,[::]:8443``); an empty value or ``off`` is an empty list
(``TLSPROXY_HTTP_LISTEN=off`` turns port 80 off) or, for ``TLSPROXY_ADMIN_LISTEN``, turns the
admin listener off. A ``TLSPROXY_`` variable that is not one of :data:`VARIABLES` is refused,
as unknown keys in the file are: a misspelt variable must not be silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from proxy.config import Config, ConfigError, parse_config, read_toml

PREFIX = "TLSPROXY_"

Kind = Literal["string", "list", "address", "integer", "seconds"]


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable and the config key it sets."""

    name: str
    table: str  # "server" | "tls" | "acme"
    key: str
    kind: Kind
    secret: bool = False  # never printed

    @property
    def path(self) -> str:
        """The key as problems name it, e.g. ``server.https_listen``."""
        return f"{self.table}.{self.key}"


VARIABLES: tuple[Variable, ...] = (
    Variable("TLSPROXY_HTTPS_LISTEN", "server", "https_listen", "list"),
    Variable("TLSPROXY_HTTP_LISTEN", "server", "http_listen", "list"),
    Variable("TLSPROXY_HTTPS_PORT", "server", "https_port", "integer"),
    Variable("TLSPROXY_ADMIN_LISTEN", "server", "admin_listen", "address"),
    Variable("TLSPROXY_ADMIN_TOKEN", "server", "admin_token", "string", secret=True),
    Variable("TLSPROXY_ACCESS_LOG", "server", "access_log", "string"),
    Variable("TLSPROXY_TRUSTED_PROXIES", "server", "trusted_proxies", "list"),
    Variable("TLSPROXY_PROXY_PROTOCOL", "server", "proxy_protocol", "list"),
    Variable("TLSPROXY_SHUTDOWN_TIMEOUT", "server", "shutdown_timeout", "seconds"),
    Variable("TLSPROXY_STORAGE", "tls", "storage", "string"),
    Variable("TLSPROXY_ISSUER", "tls", "issuer", "string"),
    Variable("TLSPROXY_ACME_EMAIL", "acme", "email", "string"),
    Variable("TLSPROXY_ACME_DIRECTORY", "acme", "directory", "string"),
    Variable("TLSPROXY_ACME_CA_BUNDLE", "acme", "ca_bundle", "string"),
    Variable("TLSPROXY_ACME_EAB_KID", "acme", "eab_kid", "string"),
    Variable("TLSPROXY_ACME_EAB_HMAC_KEY", "acme", "eab_hmac_key", "string", secret=True),
)
_BY_NAME = {variable.name: variable for variable in VARIABLES}
_OFF = ("", "off")


@dataclass(frozen=True, slots=True)
class Override:
    """A variable found in the environment, with the TOML value it stands for."""

    variable: Variable
    value: object  # as it would be written in the TOML file


def overrides(environ: Mapping[str, str] | None = None) -> list[Override]:
    """The ``TLSPROXY_*`` variables set in ``environ`` (default ``os.environ``), in
    :data:`VARIABLES` order; raises :class:`ConfigError` naming any unknown one."""
    environ = os.environ if environ is None else environ
    unknown = sorted(name for name in environ if name.startswith(PREFIX) and name not in _BY_NAME)
    if unknown:
        known = ", ".join(_BY_NAME)
        raise ConfigError(
            [f"{name}: unknown environment variable (known: {known})" for name in unknown]
        )
    return [
        Override(variable, _value(variable.kind, environ[variable.name]))
        for variable in VARIABLES
        if variable.name in environ
    ]


def _value(kind: Kind, text: str) -> object:
    """The TOML value for a variable's text; what does not convert is passed on as a string,
    so that validation reports it under its key."""
    text = text.strip()
    if kind == "list":
        return [] if text in _OFF else [item.strip() for item in text.split(",") if item.strip()]
    if kind == "address":
        return "" if text in _OFF else text
    if kind == "integer" and text.isascii() and text.isdigit():
        return int(text)
    if kind == "seconds":
        for number in (int, float):
            try:
                return number(text)
            except ValueError:
                continue
    return text


def apply(data: Mapping[str, object], found: list[Override]) -> dict[str, object]:
    """A copy of parsed TOML ``data`` with the overrides set (``data`` is not changed).

    A table that is not a table in the file is left alone: validation reports it.
    """
    result: dict[str, object] = dict(data)
    for override in found:
        table = result.get(override.variable.table, {})
        if not isinstance(table, Mapping):
            continue
        table = dict(table)
        table[override.variable.key] = override.value
        result[override.variable.table] = table
    return result


def parse_with_env(data: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Config:
    """:func:`proxy.config.parse_config` after applying the environment's overrides; problems
    with an overridden key name the variable too."""
    return _parse(data, overrides(environ))


def _parse(data: Mapping[str, object], found: list[Override]) -> Config:
    try:
        return parse_config(apply(data, found))
    except ConfigError as error:
        raise ConfigError([_annotate(problem, found) for problem in error.problems]) from None


def load_config_with_env(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Config:
    """Read a TOML file, apply the environment's overrides, validate: what ``tlsproxy run``
    uses. Errors are :class:`ConfigError`, worded as :func:`proxy.config.load_config`'s."""
    found = overrides(environ)  # an unknown variable is reported before the file is read
    return _parse(read_toml(path), found)


def describe(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per override in effect, e.g. ``tls.storage = '/data' (TLSPROXY_STORAGE)``;
    secrets are shown as ``'***'``."""
    return [
        f"{o.variable.path} = {'***' if o.variable.secret else o.value!r} ({o.variable.name})"
        for o in overrides(environ)
    ]


def _annotate(problem: str, found: list[Override]) -> str:
    """``server.https_listen[0]: ...`` -> ``server.https_listen[0] (from TLSPROXY_...): ...``."""
    key, colon, message = problem.partition(": ")
    for override in found:
        path = override.variable.path
        if colon and (key == path or key.startswith((path + "[", path + "."))):
            return f"{key} (from {override.variable.name}): {message}"
    return problem
