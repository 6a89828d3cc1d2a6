"""The docs' examples are real: configurations pass ``tlsproxy check``, commands parse with the
real command-line parsers (tlsproxy's, uvicorn's), links resolve, tables match the code, and
the FastAPI and library examples run (real uvicorn and a real tlsproxy on loopback) and do
what the text around them says.

A code block preceded by ``<!-- test: NAME -->`` is one a test below runs by that name.
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy
from proxy import ACMEConfig, ServerConfig, TLSConfig
from proxy.cli import _parser as tlsproxy_parser
from proxy.config import parse_config, start_problems
from proxy.envconfig import VARIABLES
from tests.support import (
    ROOT,
    ProxyProcess,
    RawUpstream,
    free_port,
    https_request,
    stop_process,
    wait_for_port,
)
from tests.test_container import ACME_NOT_YET, build_arg

DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


# -- reading the docs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its language, its text and its test name if any."""

    path: Path
    line: int
    language: str
    text: str
    name: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!-- test: ([a-z0-9-]+) -->\s*$")


def blocks(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        indent, language = fence.groups()
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.match(previous)
        start = index + 1
        end = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
        body = [line.removeprefix(indent) for line in lines[start:end]]
        found.append(
            Block(
                path, start, language, "\n".join(body) + "\n", marker.group(1) if marker else None
            )
        )
        index = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def named(name: str) -> Block:
    [block] = [block for block in ALL_BLOCKS if block.name == name]
    return block


def of_language(*languages: str) -> list[Any]:
    return [
        pytest.param(block, id=block.where) for block in ALL_BLOCKS if block.language in languages
    ]


def test_the_docs_have_examples() -> None:
    assert {page.name for page in PAGES} >= {
        "quickstart.md",
        "fastapi.md",
        "local-development.md",
        "container.md",
        "library.md",
        "migrating.md",
        "operations.md",
        "README.md",
    }
    names = [block.name for block in ALL_BLOCKS if block.name]
    assert len(names) == len(set(names)), "a test name is used twice"


# -- configurations, YAML, Python ---------------------------------------------------------


@pytest.mark.parametrize("block", of_language("toml"))
def test_every_configuration_passes_check(block: Block) -> None:
    config = parse_config(tomllib.loads(block.text))
    problems = [p for p in start_problems(config) if not p.startswith(ACME_NOT_YET)]
    assert problems == [], block.where


def metric_names() -> set[str]:
    """Every metric name the proxy's source registers or builds."""
    source = "".join(path.read_text() for path in (ROOT / "proxy").glob("*.py"))
    return set(re.findall(r'"(tlsproxy_[a-z_]+)"', source))


@pytest.mark.parametrize("block", of_language("yaml"))
def test_every_yaml_example_parses(block: Block) -> None:
    document = yaml.safe_load(block.text)
    assert isinstance(document, dict), block.where
    used = set(re.findall(r"\b(tlsproxy_[a-z_]+?)(?:_bucket|_sum|_count)?\b", block.text))
    assert used <= metric_names(), f"{block.where}: no such metric: {used - metric_names()}"


@pytest.mark.parametrize("block", of_language("python"))
def test_every_python_example_compiles(block: Block) -> None:
    compile(block.text, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


# -- commands -----------------------------------------------------------------------------


def command_lines(text: str) -> Iterator[str]:
    """Shell lines with continuations joined."""
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield (pending + line).strip()
        pending = ""


def tlsproxy_arguments(words: Sequence[str]) -> list[str] | None:
    """The arguments of a tlsproxy command in a shell line, or None if it runs none.

    ``tlsproxy ...``, ``/path/to/tlsproxy ...``, ``python -m proxy ...``, and the command
    after the image name in ``docker run ... tlsproxy ...`` (without one, the image's own).
    """
    if not words:
        return None
    if words[0] == "docker":
        if words[1] != "run" or "tlsproxy" not in words:
            return None
        image = len(words) - 1 - words[::-1].index("tlsproxy")
        return list(words[image + 1 :]) or None
    if Path(words[0]).name == "tlsproxy":
        return list(words[1:])
    if Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "proxy"]:
        return list(words[3:])
    return None


def tlsproxy_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, arguments) for every tlsproxy command in the docs: shell blocks, the systemd
    unit's ``Exec...=`` lines, and inline code that gives arguments (not just a name)."""
    for block in ALL_BLOCKS:
        if block.language not in ("sh", "ini"):
            continue
        for line in command_lines(block.text):
            if block.language == "ini":
                line = line.split("=", 1)[1] if re.match(r"Exec\w+=", line) else ""
            arguments = tlsproxy_arguments(shlex.split(line, comments=True))
            if arguments is not None:
                yield block.where, arguments
    for page in PAGES:
        for span in re.findall(r"`(tlsproxy [^`]+)`", page.read_text()):
            if "[" in span or span.split()[-1].isupper():  # a synopsis: check its words below
                span = re.sub(r"\[|\]|\.\.\.", "", span)
                span = re.sub(r"--from HOST2", "", span)
                span = re.sub(r"\bPORT\b", "443", span)  # a number, for type=int
            words = shlex.split(span)
            if len(words) > 2:
                yield str(page.relative_to(ROOT)), words[1:]


def test_every_tlsproxy_command_parses() -> None:
    parser = tlsproxy_parser()
    seen = 0
    for where, argv in tlsproxy_commands():
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{where}: tlsproxy {' '.join(argv)}: {errors.getvalue()}")
        seen += 1
    assert seen >= 10


def uvicorn_options(argv: Sequence[str]) -> dict[str, Any]:
    """uvicorn's own parser over a ``uvicorn ...`` command line."""
    from uvicorn.main import main as uvicorn_main

    assert Path(argv[0]).name == "uvicorn"
    with uvicorn_main.make_context("uvicorn", list(argv[1:])) as context:
        return dict(context.params)


def test_every_uvicorn_command_parses() -> None:
    commands = [
        (block.where, shlex.split(line))
        for block in ALL_BLOCKS
        if block.language == "sh"
        for line in command_lines(block.text)
        if line and Path(line.split()[0]).name == "uvicorn"
    ]
    assert commands
    for where, argv in commands:
        options = uvicorn_options(argv)
        assert options["proxy_headers"] is True, where
        assert options["forwarded_allow_ips"] not in (None, "*"), where


def test_the_systemd_unit_runs_real_commands() -> None:
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(named("systemd").text)
    service = unit["Service"]
    for key in ("ExecStartPre", "ExecStart"):
        argv = shlex.split(service[key])
        assert Path(argv[0]).name == "tlsproxy"
        tlsproxy_parser().parse_args(argv[1:])
    assert float(service["TimeoutStopSec"]) > ServerConfig().shutdown_timeout
    assert service["StateDirectory"] == "tlsproxy"


# -- tables and links ---------------------------------------------------------------------


def table_rows(page: str, first_header: str) -> list[list[str]]:
    """The cells of the table whose first column is headed ``first_header``."""
    rows: list[list[str]] = []
    inside = False
    for line in (DOCS / page).read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            inside = True
        elif inside and line.startswith("|"):
            if not set(cells[0]) <= {"-", ":"}:
                rows.append(cells)
        elif inside:
            break
    assert rows, f"no table headed {first_header!r} in {page}"
    return rows


def test_the_environment_table_is_every_variable() -> None:
    rows = {row[0].strip("`"): row[1].strip("`") for row in table_rows("container.md", "Variable")}
    assert rows == {variable.name: variable.path for variable in VARIABLES}
    tables = {"server": ServerConfig, "tls": TLSConfig, "acme": ACMEConfig}
    for variable in VARIABLES:
        assert variable.key in {f.name for f in fields(tables[variable.table])}, variable


def test_the_library_table_is_the_public_api() -> None:
    rows = {row[0].strip("`") for row in table_rows("library.md", "Name")}
    assert rows == set(proxy.__all__)
    for name in proxy.__all__:
        doc = getattr(proxy, name).__doc__ or ""
        assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_link_resolves() -> None:
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        base = page.parent
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (base / file).resolve() if file else page
            assert path.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in anchors(path), f"{page.name}: {target}: no such heading"


def test_the_docs_name_the_image_the_dockerfile_builds() -> None:
    base = build_arg("PYTHON_IMAGE")
    for page in PAGES:
        for image in re.findall(r"python:3\.\d+\.\d+-slim-\w+", page.read_text()):
            assert image == base, page.name


# -- running the examples -----------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def toml_text(config: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for key, value in config.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            lines.append(f"[[{key}]]" if isinstance(value, list) else f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def this_checkout() -> dict[str, str]:
    """The environment for ``python -m proxy`` run outside the checkout: this checkout's
    ``proxy`` package first, whichever one the virtual environment has installed."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start_proxy(
    directory: Path, block: Block, upstreams: Mapping[str, str], storage: str = "data"
) -> ProxyProcess:
    """The docs' configuration on free loopback ports with the internal CA; its upstream URLs
    replaced as ``upstreams`` says (every one must be replaced)."""
    config = tomllib.loads(block.text)
    https_port, http_port = free_port(), free_port()
    config["server"] = {
        **config.get("server", {}),
        "https_listen": [f"127.0.0.1:{https_port}"],
        "http_listen": [f"127.0.0.1:{http_port}"],
        "https_port": https_port,
        "admin_listen": "",
    }
    config["tls"] = {**config.get("tls", {}), "storage": storage, "issuer": "internal"}
    for site in config["sites"]:
        site["upstreams"] = [upstreams[url] for url in site["upstreams"]]
        for route in site.get("routes", []):
            route["upstreams"] = [upstreams[url] for url in route["upstreams"]]
    path = directory / "proxy.toml"
    path.write_text(toml_text(config))
    log_path = directory / "proxy.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(path)],
            cwd=directory,
            env=this_checkout(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = ProxyProcess(directory, https_port, http_port, process, log_path)
    try:
        wait_for_port(https_port, process=process)
    except BaseException:
        running.stop()
        raise
    return running


@contextlib.contextmanager
def uvicorn(directory: Path, app_block: Block, *extra: str) -> Iterator[str]:
    """The docs' uvicorn command (on a free port) serving ``app_block`` as main.py; yields
    the app's URL."""
    (directory / "main.py").write_text(app_block.text)
    [line] = [line for line in command_lines(named("uvicorn").text) if line]
    argv = shlex.split(line)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    process = subprocess.Popen(
        [sys.executable, "-m", *argv, *extra, "--log-level", "warning"], cwd=directory
    )
    try:
        wait_for_port(port, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


@contextlib.contextmanager
def running_proxy(
    directory: Path, block: Block, upstreams: Mapping[str, str], storage: str = "data"
) -> Iterator[ProxyProcess]:
    running = start_proxy(directory, block, upstreams, storage)
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, body = decoded + body[:size], body[size + 2 :]
        body = decoded
    return Reply(int(status_line.split()[1]), headers, body)


def through(
    running: ProxyProcess,
    path: str,
    *,
    host: str = "example.com",
    source: str | None = None,
) -> Reply:
    """GET ``path`` through the proxy: TLS with SNI ``host``, verified by the internal root."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    return parse_reply(https_request(running, host, request, source=source))


def direct(app_url: str, path: str, headers: Mapping[str, str], source: str) -> Reply:
    """GET ``path`` straight to the app, from ``source``, bypassing the proxy."""
    port = int(app_url.rsplit(":", 1)[1])
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"GET {path} HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(request)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return parse_reply(b"".join(chunks))


def plain(running: ProxyProcess, path: str, host: str) -> Reply:
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return parse_reply(b"".join(chunks))


APP_UPSTREAM = "http://127.0.0.1:8000"


def test_fastapi_the_short_version_behaves_as_documented(tmp_path: Path) -> None:
    with (
        uvicorn(tmp_path, named("app")) as app,
        running_proxy(tmp_path, named("proxy"), {APP_UPSTREAM: app}) as running,
    ):
        reply = through(running, "/whoami", source="127.0.0.5")
        assert reply.status == 200
        assert reply.json() == {
            "client": "127.0.0.5",
            "scheme": "https",
            "url": "https://example.com/whoami",
            "items": "https://example.com/items/",
        }
        assert reply.headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"

        slash = through(running, "/items")
        assert (slash.status, slash.headers["location"]) == (307, "https://example.com/items/")

        redirect = plain(running, "/whoami?x=1", "www.example.com")
        assert redirect.status == 308
        assert redirect.headers["location"] == (
            f"https://www.example.com:{running.https_port}/whoami?x=1"
        )

        other = https_request(
            running,
            "example.com",
            b"GET /whoami HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        )
        assert parse_reply(other).status == 421

        # Around the proxy: TrustedHostMiddleware, and the forwarding headers are not trusted.
        spoof = {"Host": "example.com", "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Proto": "https"}
        bypass = direct(app, "/whoami", spoof, source="127.0.0.9")
        assert bypass.json()["client"] == "127.0.0.9" and bypass.json()["scheme"] == "http"
        wrong_host = direct(app, "/whoami", {"Host": "evil.example"}, source="127.0.0.9")
        assert (wrong_host.status, wrong_host.body) == (400, b"Invalid host header")

    # The reason not to use '*': anyone who reaches the app chooses its client and scheme.
    with uvicorn(tmp_path, named("app"), "--forwarded-allow-ips=*") as careless:
        spoofed = direct(careless, "/whoami", spoof, source="127.0.0.9").json()
        assert (spoofed["client"], spoofed["scheme"]) == ("10.0.0.1", "https")


FRONT_END = "http://127.0.0.1:3000"


def test_fastapi_a_mounted_api_under_a_route_prefix(tmp_path: Path) -> None:
    front = RawUpstream()
    try:
        with (
            uvicorn(tmp_path, named("prefix-mount")) as app,
            running_proxy(
                tmp_path, named("prefix-proxy"), {APP_UPSTREAM: app, FRONT_END: front.url}
            ) as running,
        ):
            docs = through(running, "/api/docs")
            assert docs.status == 200 and b"url: '/api/openapi.json'" in docs.body
            schema = through(running, "/api/openapi.json").json()
            assert schema["servers"] == [{"url": "/api"}]
            assert list(schema["paths"]) == ["/items/{item_id}"]
            item = through(running, "/api/items/1")
            assert item.json() == {"item_id": 1, "self": "https://example.com/api/items/1"}
            root = through(running, "/")
            assert root.body == b"raw upstream %d" % front.port
    finally:
        front.close()


def test_fastapi_the_prefix_in_the_routes(tmp_path: Path) -> None:
    with (
        uvicorn(tmp_path, named("prefix-router")) as app,
        running_proxy(tmp_path, named("prefix-proxy"), {APP_UPSTREAM: app, FRONT_END: app}) as p,
    ):
        docs = through(p, "/api/docs")
        assert docs.status == 200 and b"url: '/api/openapi.json'" in docs.body
        assert list(through(p, "/api/openapi.json").json()["paths"]) == ["/api/items/{item_id}"]
        assert through(p, "/api/items/1").json() == {"item_id": 1}


def test_fastapi_root_path_option_is_wrong_behind_a_route(tmp_path: Path) -> None:
    """What the docs warn about: uvicorn --root-path with a prefix tlsproxy does not strip."""
    routes = {APP_UPSTREAM: "", FRONT_END: ""}
    with (
        uvicorn(tmp_path, named("prefix-router"), "--root-path", "/api") as app,
        running_proxy(tmp_path, named("prefix-proxy"), dict.fromkeys(routes, app)) as p,
    ):
        docs = through(p, "/api/docs")
        assert docs.status == 200 and b"url: '/api/api/openapi.json'" in docs.body
    with (
        uvicorn(tmp_path, named("app"), "--root-path", "/api") as app,
        running_proxy(tmp_path, named("prefix-proxy"), dict.fromkeys(routes, app)) as p,
    ):
        assert through(p, "/api/items/").status == 404
        assert through(p, "/items/").status == 200  # it only works without the prefix


def test_the_library_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "library.py"
    script.write_text(named("library").text)
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert re.fullmatch(r"listening on port \d+", first) and first != "listening on port 0"
    assert second == "sites: ['app.localhost', 'api.localhost']"


def test_the_parse_config_example_runs() -> None:
    namespace: dict[str, Any] = {}
    exec(named("parse").text, namespace)
    assert isinstance(namespace["config"], proxy.Config)


def test_local_development_trusting_the_root_from_python(tmp_path: Path) -> None:
    sites = {APP_UPSTREAM: "", "http://127.0.0.1:9000": ""}
    block = named("development")
    assert tomllib.loads(block.text)["tls"]["storage"] == "./tlsproxy-data"
    app = RawUpstream()
    try:
        with running_proxy(tmp_path, block, dict.fromkeys(sites, app.url), "./tlsproxy-data") as p:
            snippet = named("trust-python").text
            assert "https://localhost:8443/" in snippet
            script = tmp_path / "trust.py"
            script.write_text(snippet.replace(":8443/", f":{p.https_port}/"))
            result = subprocess.run(
                [sys.executable, str(script)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
    finally:
        app.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"200 b'raw upstream {app.port}'\n"


# -- what the docs say the proxy does, against what it does --------------------------------


def test_the_connect_timeout_answer_is_the_one_the_docs_give(tmp_path: Path) -> None:
    """README: the [server] table and the errors table name the status of a connect timeout."""
    [setting] = [r for r in table_rows("../README.md", "Key") if "upstream_connect_timeout" in r[0]]
    [error] = [
        r for r in table_rows("../README.md", "Situation") if "upstream_connect_timeout" in r[0]
    ]
    claimed = {int(code) for code in re.findall(r"\b(5\d\d)\b", setting[3] + " " + error[1])}
    # An upstream whose accept queue is full: the kernel drops further SYNs, connect hangs.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    queued = [socket.socket() for _ in range(4)]
    for sock in queued:
        sock.setblocking(False)
        sock.connect_ex(silent.getsockname())
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    running = ProxyProcess.start(
        tmp_path,
        [{"hosts": ["slow.test"], "upstreams": [url]}],
        server={"upstream_connect_timeout": 0.5},
    )
    try:
        reply = through(running, "/", host="slow.test")
    finally:
        assert running.stop() == 0, running.log()
        for sock in [*queued, silent]:
            sock.close()
    assert claimed == {reply.status}, (claimed, reply.status, reply.body)
    assert b"did not accept within 0.5 s" in reply.body or "did not accept" in running.log()


def test_local_development_one_certificate_per_site(tmp_path: Path) -> None:
    """docs/local-development.md: one certificate per site, for all of its hosts."""
    text = " ".join((DOCS / "local-development.md").read_text().split())
    assert "Each site gets one certificate from the CA, valid for all of its `hosts`" in text
    block = named("development")
    app = RawUpstream()
    try:
        upstreams = dict.fromkeys(["http://127.0.0.1:8000", "http://127.0.0.1:9000"], app.url)
        with running_proxy(tmp_path, block, upstreams) as running:
            context = running.client_context()
            served: dict[str, tuple[str, set[str]]] = {}
            for name in ("localhost", "app.localhost", "api.localhost"):
                with (
                    socket.create_connection(("127.0.0.1", running.https_port), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname=name) as tls,
                ):
                    peer = tls.getpeercert()
                    assert peer is not None
                    cert: dict[str, Any] = dict(peer)
                    names = {value for kind, value in cert["subjectAltName"] if kind == "DNS"}
                    served[name] = (cert["serialNumber"], names)
    finally:
        app.close()
    assert served["localhost"] == served["app.localhost"]
    assert served["localhost"][1] == {"localhost", "app.localhost"}
    assert served["api.localhost"][1] == {"api.localhost"}


def fresh_shell_commands(page: Path) -> Iterator[tuple[str, list[str]]]:
    """(where, words) of every command in a page's shell blocks, ``&&`` chains split."""
    for block in blocks(page):
        if block.language != "sh":
            continue
        for line in command_lines(block.text):
            for command in re.split(r"&&|\|\||;", line):
                words = shlex.split(command, comments=True)
                if words:
                    yield block.where, words


def test_the_quickstart_runs_in_a_fresh_shell(tmp_path: Path) -> None:
    """Every command names a program a fresh shell has (python3, curl) or one the install
    step put into .venv/bin/; and step 2, run as written (other ports), answers over HTTPS."""
    page = DOCS / "quickstart.md"
    [install] = [line for line in command_lines(named("install").text) if line]
    extras = re.search(r"\.\[([a-z,]+)\]", install)
    provided = {"pip", "python", "tlsproxy"}
    if extras and "examples" in extras.group(1).split(","):
        provided.add("uvicorn")
    for where, words in fresh_shell_commands(page):
        program = words[0]
        if program in ("python3", "curl"):
            continue
        assert program.startswith(".venv/bin/"), f"{where}: {program!r}: not on a fresh PATH"
        assert Path(program).name in provided, f"{where}: the install step gives no {program}"

    ports = {"8000": str(free_port()), "8443": str(free_port()), "8080": str(free_port())}
    here = {
        "uvicorn": [sys.executable, "-m", "uvicorn"],
        "tlsproxy": [sys.executable, "-m", "proxy"],
    }

    def command(name: str) -> list[str]:
        [line] = [line for line in command_lines(named(name).text) if line]
        for port, free in ports.items():
            line = line.replace(port, free)
        words = shlex.split(line)
        return [*here.get(Path(words[0]).name, words[:1]), *words[1:]]

    app = subprocess.Popen([*command("try-locally"), "--log-level", "warning"], cwd=ROOT)
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log:
        running = subprocess.Popen(
            command("try-locally-proxy"),
            cwd=tmp_path,
            env=this_checkout(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(int(ports["8000"]), process=app)
        wait_for_port(int(ports["8443"]), process=running)
        curl = command("try-locally-curl")  # and the same from port 80's stand-in, with -L
        followed = [*curl[:-1], "-L", f"http://app.localhost:{ports['8080']}/"]
        answers = [
            subprocess.run(
                [*argv, "-sS", "--max-time", "10"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            for argv in (curl, followed)
        ]
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"{exc.stderr}\n{log_path.read_text()}") from exc
    finally:
        assert stop_process(running) == 0, log_path.read_text()
        stop_process(app)
    for answer in answers:
        seen = json.loads(answer)
        assert seen["scheme"] == "https" and seen["client"] == "127.0.0.1", seen
        assert seen["host"] == f"app.localhost:{ports['8443']}"
