"""Try tlsproxy in one command: the example FastAPI app behind the proxy, internal CA.

Starts ``examples/app.py`` under uvicorn on 127.0.0.1:8000 and tlsproxy on
https://localhost:8443 (port 80's job on 127.0.0.1:8080), waits until the app answers, then
prints the curl line that trusts the proxy's local root. No internet needed. Ctrl-C (SIGINT)
or SIGTERM stops both.

Environment variables (all optional):

  TLSPROXY_DEMO_HTTPS_PORT  the proxy's HTTPS port (default 8443)
  TLSPROXY_DEMO_HTTP_PORT   its plain-HTTP port, which redirects to HTTPS (default 8080)
  TLSPROXY_DEMO_APP_PORT    the example app's port (default 8000)
  TLSPROXY_DEMO_STORAGE     where the local CA and certificates are kept
                            (default ./tlsproxy-data in the checkout)

A default port that another program holds is replaced by a free one (the demo says which);
a port you set that is taken is refused, with a message, and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvloop

from proxy import Proxy, parse_config

ROOT = Path(__file__).resolve().parent.parent
STORAGE = Path(os.environ.get("TLSPROXY_DEMO_STORAGE", ROOT / "tlsproxy-data"))
APP_START_TIMEOUT = 30.0  # seconds for uvicorn to import the app and listen


class PortTaken(Exception):
    """A port the user set is held by another program."""


def choose_port(variable: str, default: int) -> int:
    """The port ``variable`` sets (refused if taken), else ``default``, else a free one.

    Free means nothing listens on 127.0.0.1 at that port: otherwise the proxy would forward
    to whatever program holds it, or fail to start.
    """
    wanted = os.environ.get(variable)
    port = int(wanted) if wanted else default
    if _free(port):
        return port
    if wanted:
        raise PortTaken(
            f"{variable}={port}: port {port} on 127.0.0.1 is taken by another program; "
            f"set {variable} to a free port"
        )
    with socket.create_server(("127.0.0.1", 0)) as sock:
        free: int = sock.getsockname()[1]
    print(
        f"port {port} is taken by another program: using {free} instead (set {variable} to choose)",
        flush=True,
    )
    return free


def _free(port: int) -> bool:
    try:
        with socket.create_server(("127.0.0.1", port)):
            return True
    except OSError:
        return False


async def serve(https_port: int, http_port: int, app_port: int) -> int:
    """Start the app, wait until it listens, run the proxy in front of it until a signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = await asyncio.create_subprocess_exec(  # after the handlers: a signal stops it too
        sys.executable,
        "-m",
        "uvicorn",
        "examples.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(app_port),
        "--proxy-headers",
        "--forwarded-allow-ips",
        "127.0.0.1",
        "--log-level",
        "warning",
        cwd=ROOT,
    )
    try:
        if not await _listening(app, app_port, stop):
            return 0 if stop.is_set() else 1
        config = parse_config(
            {
                "server": {
                    "https_listen": [f"127.0.0.1:{https_port}"],
                    "http_listen": [f"127.0.0.1:{http_port}"],
                    "https_port": https_port,
                    "admin_listen": "",
                },
                "tls": {"issuer": "internal", "storage": str(STORAGE)},
                "sites": [{"hosts": ["localhost"], "upstreams": [f"http://127.0.0.1:{app_port}"]}],
            }
        )
        try:
            proxy = Proxy(config)
            await proxy.start()
        except OSError as exc:  # a port taken since it was chosen
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        try:
            root = STORAGE / "ca" / "root.pem"
            print(
                f"\ntlsproxy is serving the example app at https://localhost:{https_port}/\n"
                f"try:  curl --cacert {root} https://localhost:{https_port}/\n"
                "(Ctrl-C to stop)\n",
                flush=True,
            )
            await stop.wait()
        finally:
            await proxy.stop()
        return 0
    finally:
        if app.returncode is None:
            app.terminate()
        try:
            await asyncio.wait_for(app.wait(), 10)
        except TimeoutError:
            app.kill()
            await app.wait()


async def _listening(app: asyncio.subprocess.Process, port: int, stop: asyncio.Event) -> bool:
    """Whether the app came up: True once its port accepts, False if it exited, a signal
    came first, or it took longer than APP_START_TIMEOUT."""
    deadline = time.monotonic() + APP_START_TIMEOUT
    while not stop.is_set():
        if app.returncode is not None:
            print(f"the example app exited with status {app.returncode}", file=sys.stderr)
            return False
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                print(
                    f"the example app did not listen within {APP_START_TIMEOUT:.0f} s",
                    file=sys.stderr,
                )
                return False
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


def main() -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        https_port = choose_port("TLSPROXY_DEMO_HTTPS_PORT", 8443)
        http_port = choose_port("TLSPROXY_DEMO_HTTP_PORT", 8080)
        app_port = choose_port("TLSPROXY_DEMO_APP_PORT", 8000)
    except PortTaken as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    code: int = uvloop.run(serve(https_port, http_port, app_port))
    return code


if __name__ == "__main__":
    sys.exit(main())
