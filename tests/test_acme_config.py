"""The ``[acme]`` table and what ``check``/``run``/``certs``/``renew`` say about ACME sites
(no CA needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ACMEConfig, ConfigError, parse_config, start_problems
from tests.support import ROOT, to_toml

UPSTREAM = ["http://127.0.0.1:8000"]


def config_with(acme: dict[str, Any] | None = None, **site: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"sites": [{"hosts": ["a.test"], "upstreams": UPSTREAM, **site}]}
    if acme is not None:
        data["acme"] = acme
    return data


def test_acme_sites_are_accepted() -> None:
    config = parse_config(config_with())
    assert config.tls.issuer == "acme"
    assert start_problems(config) == []


def test_wildcard_hosts_cannot_be_validated_over_http01() -> None:
    config = parse_config(config_with(hosts=["a.test", "*.apps.a.test"]))
    (problem,) = start_problems(config)
    assert problem.startswith("sites[0].hosts[1]: '*.apps.a.test': a wildcard certificate needs")
    assert 'add "dns-01" to acme.challenges and configure [acme.dns]' in problem
    # with its own files, or from the internal CA, a wildcard site is fine
    files = config_with(hosts=["*.apps.a.test"], cert="/c.pem", key="/k.pem")
    assert start_problems(parse_config(files)) == []
    internal = config_with(hosts=["*.apps.a.test"]) | {"tls": {"issuer": "internal"}}
    assert start_problems(parse_config(internal)) == []


def test_dns01_and_its_table_come_together_and_allow_wildcards() -> None:
    dns = {"provider": "exec", "command": ["/bin/true"]}
    both = config_with({"challenges": ["dns-01"], "dns": dns}, hosts=["*.apps.a.test"])
    assert start_problems(parse_config(both)) == []
    (problem,) = start_problems(parse_config(config_with({"challenges": ["dns-01"]})))
    assert problem == 'acme.challenges: "dns-01" needs an [acme.dns] table (provider, ...)'
    (problem,) = start_problems(parse_config(config_with({"dns": dns})))
    assert problem.startswith('acme.dns: configured, but acme.challenges does not list "dns-01"')


def test_dns_table_problems_name_their_keys_and_never_the_secret() -> None:
    secret = "not base64 but secret!"
    data = config_with({"challenges": ["dns-01"], "dns": {"tsig_secret": secret, "zone": 1}})
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert raised.value.problems == [
        "acme.dns.tsig_secret: expected base64 (the secret itself is not shown here)",
        "acme.dns.zone: expected a string, got an integer (1)",
        'acme.dns.server: required with provider = "rfc2136"',
        'acme.dns.tsig_key: required with provider = "rfc2136"',
        "acme.dns.tsig_secret: give tsig_secret or tsig_secret_file (one of them)",
    ]
    assert secret not in str(raised.value)
    good = {"server": "ns1.a.test:53", "tsig_key": "k.", "tsig_secret": "c2VjcmV0"}
    config = parse_config(config_with({"challenges": ["dns-01"], "dns": good}))
    assert "c2VjcmV0" not in repr(config)  # a logged config never shows the secret


def test_issuers_replace_the_single_directory_and_inherit_the_email() -> None:
    issuers = [{"directory": "https://a.test/dir"}, {"directory": "https://b.test/dir"}]
    config = parse_config(config_with({"email": "ops@a.test", "issuers": issuers}))
    assert [(ca.directory, ca.email) for ca in config.acme.cas] == [
        ("https://a.test/dir", "ops@a.test"),
        ("https://b.test/dir", "ops@a.test"),
    ]
    assert [ca.directory for ca in parse_config(config_with()).acme.cas] == [ACMEConfig().directory]
    both = config_with({"directory": "https://c.test/dir", "issuers": [{"eab_kid": "k"}]})
    with pytest.raises(ConfigError) as raised:
        parse_config(both)
    assert raised.value.problems == [
        "acme.issuers[0].directory: required: the CA's directory URL",
        "acme.issuers[0].eab_hmac_key: missing: eab_kid is set, give both or neither",
        "acme.directory: not used with [[acme.issuers]]: give it in each issuer",
    ]


def test_external_account_binding_keys() -> None:
    config = parse_config(config_with({"eab_kid": "kid-1", "eab_hmac_key": "zWNDZM6e_-Q="}))
    assert config.acme == ACMEConfig(eab_kid="kid-1", eab_hmac_key="zWNDZM6e_-Q=")
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with({"eab_kid": "kid-1"}))
    assert caught.value.problems == [
        "acme.eab_hmac_key: missing: eab_kid is set, give both or neither"
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with({"eab_kid": "k", "eab_hmac_key": "not base64!"}))
    assert caught.value.problems == [
        "acme.eab_hmac_key: expected the base64url HMAC key your CA gave you"
    ]


def test_a_missing_ca_bundle_is_reported(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    config = parse_config(config_with({"ca_bundle": missing}))
    assert start_problems(config) == [f"acme.ca_bundle: {missing!r}: no such file"]


def tlsproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    data.setdefault("tls", {})["storage"] = str(tmp_path / "data")
    path = tmp_path / "acme.toml"
    path.write_text(to_toml(data))
    return path


def test_check_certs_and_renew_without_a_certificate_yet(tmp_path: Path) -> None:
    path = write(tmp_path, config_with())
    result = tlsproxy("check", "--config", str(path))
    assert result.returncode == 0, result.stderr

    result = tlsproxy("certs", "--config", str(path))
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[1]
    assert row.split()[:2] == ["a.test", "acme:acme-v02.api.letsencrypt.org"]
    assert "when the proxy starts" in row
    assert not (tmp_path / "data").exists()  # certs never creates anything

    result = tlsproxy("renew", "--config", str(path), "other.test")
    assert result.returncode == 2
    assert "other.test: no site with this host gets its certificate from ACME" in result.stderr


def test_renew_with_no_acme_site_has_nothing_to_do(tmp_path: Path) -> None:
    path = write(tmp_path, config_with() | {"tls": {"issuer": "internal"}})
    result = tlsproxy("renew", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout


def test_on_demand_sites_need_the_ask_endpoint_and_acme() -> None:
    site = {"hosts": ["*"], "upstreams": UPSTREAM, "on_demand": True}
    config = parse_config({"sites": [site], "tls": {"on_demand": {"ask": "http://127.0.0.1:9/a"}}})
    assert start_problems(config) == []
    (problem,) = start_problems(parse_config({"sites": [site]}))
    assert problem.startswith("sites[0].on_demand: needs [tls.on_demand] ask = URL")
    internal = {"sites": [site], "tls": {"issuer": "internal", "on_demand": {"ask": "http://a/"}}}
    (problem,) = start_problems(parse_config(internal))
    assert problem.startswith('sites[0].on_demand: certificates come from ACME: issuer = "acme"')
    with pytest.raises(ConfigError) as raised:
        parse_config({"sites": [{"hosts": ["*"], "upstreams": UPSTREAM}]})
    assert raised.value.problems[0].startswith("sites[0].hosts[0]: '*'")
    with pytest.raises(ConfigError) as raised:
        parse_config({"sites": [site], "tls": {"on_demand": {"ask": "http://a/?x=1"}}})
    assert raised.value.problems == [
        "tls.on_demand.ask: expected a URL such as 'http://127.0.0.1:9000/allowed', "
        "got 'http://a/?x=1'"
    ]


def test_on_demand_patterns_and_names() -> None:
    from proxy.certs.on_demand import acceptable, matches

    assert matches("*", "anything.example")
    assert matches("*.customers.test", "a.customers.test")
    assert not matches("*.customers.test", "a.b.customers.test")  # one label, as routing
    assert not matches("*.customers.test", "customers.test")
    assert acceptable("app.customer.com")
    for name in ("nodots", "10.0.0.1", "bad_name.test", "-a.test", "a..test", "x" * 64 + ".test"):
        assert not acceptable(name), name
