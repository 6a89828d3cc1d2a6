"""Try tlsproxy in one command: the example FastAPI app behind the proxy, internal CA.

Starts ``examples/app.py`` under uvicorn on 127.0.0.1:8000 and tlsproxy on
https://localhost:8443 (port 80's job on 127.0.0.1:8080), then prints the curl line that
trusts the proxy's local root. No internet needed. Ctrl-C stops both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import uvloop

from proxy import Proxy, parse_config

ROOT = Path(__file__).resolve().parent.parent
HTTPS_PORT = int(os.environ.get("TLSPROXY_DEMO_HTTPS_PORT", "8443"))
HTTP_PORT = int(os.environ.get("TLSPROXY_DEMO_HTTP_PORT", "8080"))
APP_PORT = int(os.environ.get("TLSPROXY_DEMO_APP_PORT", "8000"))
STORAGE = Path(os.environ.get("TLSPROXY_DEMO_STORAGE", ROOT / "tlsproxy-data"))


async def serve() -> None:
    """Run the proxy with the internal CA in front of the app until Ctrl-C."""
    config = parse_config(
        {
            "server": {
                "https_listen": [f"127.0.0.1:{HTTPS_PORT}"],
                "http_listen": [f"127.0.0.1:{HTTP_PORT}"],
                "https_port": HTTPS_PORT,
                "admin_listen": "",
            },
            "tls": {"issuer": "internal", "storage": str(STORAGE)},
            "sites": [{"hosts": ["localhost"], "upstreams": [f"http://127.0.0.1:{APP_PORT}"]}],
        }
    )
    async with Proxy(config) as proxy:
        root = STORAGE / "ca" / "root.pem"
        print(
            f"\ntlsproxy is serving the example app at https://localhost:{HTTPS_PORT}/\n"
            f"try:  curl --cacert {root} https://localhost:{HTTPS_PORT}/\n"
            "(Ctrl-C to stop)\n",
            flush=True,
        )
        await proxy.serve_forever()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.app:app",
            "--port",
            str(APP_PORT),
            "--proxy-headers",
            "--forwarded-allow-ips",
            "127.0.0.1",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve())
    finally:
        app.terminate()
        app.wait()


if __name__ == "__main__":
    main()
