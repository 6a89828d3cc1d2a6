"""The ``tlsproxy`` command: run, reverse-proxy, check, certs, renew (config-contract.md)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from proxy.config import Config, ConfigError, parse_config, start_problems
from proxy.envconfig import describe, load_config_with_env

log = logging.getLogger("tlsproxy")

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tlsproxy: {problem}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsproxy", description="TLS-terminating reverse proxy for FastAPI and HTTP apps."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy from a TOML config file")
    run.add_argument("--config", required=True, type=Path, metavar="FILE")
    run.set_defaults(handler=_run)

    quick = commands.add_parser(
        "reverse-proxy", help="serve --from names and forward them to --to, no config file"
    )
    quick.add_argument("--from", dest="hosts", action="append", required=True, metavar="HOST")
    quick.add_argument("--to", dest="upstreams", action="append", required=True, metavar="URL")
    quick.add_argument(
        "--internal", action="store_true", help="certificates from the local internal CA"
    )
    quick.add_argument(
        "--https-listen", action="append", metavar="ADDR", help="default 0.0.0.0:443"
    )
    quick.add_argument(
        "--http-listen",
        action="append",
        metavar="ADDR",
        help="port 80's job: ACME challenges, redirects to HTTPS (default 0.0.0.0:80; off = none)",
    )
    quick.add_argument(
        "--https-port",
        type=int,
        metavar="PORT",
        help="port written into those redirects (default: the first --https-listen's port, "
        "else 443)",
    )
    quick.add_argument("--storage", metavar="DIR", help="default ./tlsproxy-data")
    quick.add_argument(
        "--admin-listen", default="", metavar="ADDR", help="admin /healthz address (default off)"
    )
    quick.set_defaults(handler=_reverse_proxy)

    check = commands.add_parser("check", help="validate a config file (exit 2 on problems)")
    check.add_argument("--config", required=True, type=Path, metavar="FILE")
    check.set_defaults(handler=_check)

    certs = commands.add_parser("certs", help="list every managed certificate")
    certs.add_argument("--config", required=True, type=Path, metavar="FILE")
    certs.set_defaults(handler=_certs)

    renew = commands.add_parser("renew", help="obtain or renew certificates now")
    renew.add_argument("--config", required=True, type=Path, metavar="FILE")
    renew.add_argument("--force", action="store_true")
    renew.add_argument("hosts", nargs="*", metavar="HOST")
    renew.set_defaults(handler=_renew)
    return parser


def _setup_logging() -> None:
    """Diagnostics to stderr; access lines alone on stdout, so JSON lines stay parseable."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    access = logging.getLogger("tlsproxy.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def _run(args: argparse.Namespace) -> int:
    """``run``: the file, with ``TLSPROXY_*`` environment overrides (proxy/envconfig.py) applied
    at start and on every SIGHUP reload."""
    path: Path = args.config
    config = load_config_with_env(path)
    for line in describe():
        print(f"tlsproxy: environment sets {line}", file=sys.stderr)
    return serve(config, lambda: load_config_with_env(path))


def _upstream_url(text: str) -> str:
    """Accept caddy-style shorthands: ``:8000``, ``localhost:8000``, or a full URL."""
    if "://" in text:
        return text
    return f"http://127.0.0.1{text}" if text.startswith(":") else f"http://{text}"


def _port_of(address: str) -> int | None:
    """The port of an ``--https-listen`` ``host:port``; None for a malformed one, which the
    validation of server.https_listen reports."""
    port = address.rpartition(":")[2]
    return int(port) if port.isascii() and port.isdigit() else None


def _reverse_proxy(args: argparse.Namespace) -> int:
    """``reverse-proxy``: the flags become a configuration, validated as a file would be."""
    server: dict[str, Any] = {"admin_listen": args.admin_listen}
    if args.https_listen:
        server["https_listen"] = args.https_listen
    if args.https_port is not None:
        server["https_port"] = args.https_port
    elif args.https_listen and (port := _port_of(args.https_listen[0])) is not None:
        server["https_port"] = port  # redirects go where this proxy listens, not to 443
    if args.http_listen:
        server["http_listen"] = [] if args.http_listen == ["off"] else args.http_listen
    data: dict[str, Any] = {
        "server": server,
        "tls": {"issuer": "internal" if args.internal else "acme"},
        "sites": [{"hosts": args.hosts, "upstreams": [_upstream_url(u) for u in args.upstreams]}],
    }
    if args.storage:
        data["tls"]["storage"] = args.storage
    config = parse_config(data)
    return serve(config, None)


def _check(args: argparse.Namespace) -> int:
    """``check``: everything ``run`` would refuse, the files the config names included."""
    from proxy import preflight

    config = load_config_with_env(args.config)
    problems = preflight.problems(config)
    if problems:
        raise ConfigError(problems)
    hosts = sum(len(site.hosts) for site in config.sites)
    print(f"{args.config}: OK ({len(config.sites)} site(s), {hosts} host name(s))")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from proxy.certs.sources import describe_certificates

    config = load_config_with_env(args.config)
    rows = [("NAMES", "ISSUER", "NOT AFTER", "NEXT RENEWAL", "LAST ERROR")]
    rows += [
        (" ".join(s.names), s.issuer, s.not_after, s.next_renewal, s.last_error or "-")
        for s in describe_certificates(config.sites, config.tls, config.acme)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
    return 0


def _renew(args: argparse.Namespace) -> int:
    """``renew``: ACME certificates now (``--force``: even when not due), into storage."""
    from proxy.renew import renew

    config = load_config_with_env(args.config)
    problems = start_problems(config)
    if problems:
        raise ConfigError(problems)
    _setup_logging()
    return renew(config, args.hosts, args.force)


def serve(config: Config, reload_config: Callable[[], Config] | None) -> int:
    """Run a proxy until SIGTERM/SIGINT; SIGHUP reloads via ``reload_config``.

    With ``workers`` above 1 this process becomes the supervisor of that many workers.
    """
    from proxy import preflight
    from proxy.workers import supervise, worker_count

    _setup_logging()
    problems = preflight.problems(config)
    if problems:
        raise ConfigError(problems)
    count = worker_count(config.server.workers)
    if count == 1:
        return run_loop(config.server.loop, _serve(config, reload_config))
    return supervise(
        count, lambda slot: run_loop(config.server.loop, _serve(config, reload_config, True))
    )


def run_loop(kind: str, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop (the default) or the standard asyncio loop."""
    if kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    with asyncio.Runner() as runner:
        return runner.run(main)


async def _serve(
    config: Config, reload_config: Callable[[], Config] | None, reuse_port: bool = False
) -> int:
    from proxy import preflight
    from proxy.certs.sources import CertificateError
    from proxy.server import Proxy
    from proxy.tasks import spawn

    proxy = Proxy(config, reuse_port=reuse_port)
    # Signals wait until the handlers are in place: a SIGTERM during start-up must still
    # be a clean stop, not the default action.
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        await proxy.start()
    except (OSError, CertificateError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        loop = asyncio.get_running_loop()
        loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, signals)
    # What exists now (modules, configuration, certificates) lives as long as the process:
    # out of the collector's sight, full collections no longer walk it again and again
    # while connections come and go. (Only here: an embedding application decides for its
    # own process.)
    gc.freeze()

    async def reload() -> None:
        if reload_config is None:
            log.warning("SIGHUP: nothing to reload (no config file)")
            return
        try:
            config = reload_config()
            problems = await asyncio.to_thread(preflight.local_problems, config)
            if problems:
                raise ConfigError(problems)
            await proxy.reload(config)
        except ConfigError as exc:
            log.error("reload refused, old configuration kept: %s", "; ".join(exc.problems))
        except (CertificateError, OSError) as exc:  # a certificate, a listen address
            log.error("reload refused, old configuration kept: %s", exc)
        except Exception:
            log.exception("reload failed, old configuration kept")

    def on_stop(name: str) -> None:
        log.info("%s: stopping", name)
        spawn(proxy.stop(), name="stop")

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload(), name="reload"))
    await proxy.serve_forever()
    return 0
