"""tlsproxy as a library: a FastAPI app and the proxy in front of it, in one process.

    python examples/embed.py

Starts the app under uvicorn and the proxy on the same event loop, both on free loopback
ports, with certificates from the internal CA (in a temporary directory). It then makes one
HTTPS request through the proxy, verified against the internal root, prints the status and
the body, and exits 0. Nothing is left behind.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request

from proxy import Address, Config, Proxy, ServerConfig, Site, TLSConfig, Upstream

app = FastAPI(title="embedded example")


@app.get("/")
async def hello(request: Request) -> dict[str, object]:
    """What the app sees through the proxy: the client's address and scheme, and its own URL."""
    return {
        "message": "hello through tlsproxy",
        "client": request.client.host if request.client else None,
        "scheme": request.url.scheme,
        "url_for": str(request.url_for("hello")),
    }


def proxy_config(app_port: int, storage: Path) -> Config:
    """The proxy's configuration, built in code: one site in front of the app."""
    return Config(
        server=ServerConfig(
            https_listen=(Address("127.0.0.1", 0),),  # port 0: any free port; see Proxy.port()
            http_listen=(),  # no port 80 here
            admin_listen=None,
        ),
        tls=TLSConfig(storage=str(storage), issuer="internal"),
        sites=(Site(hosts=("localhost",), upstreams=(Upstream("127.0.0.1", app_port),)),),
    )


def get(port: int, root: Path) -> tuple[int, str]:
    """One verified HTTPS request to https://localhost:<port>/ (blocking: run it in a thread)."""
    context = ssl.create_default_context(cafile=str(root))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


async def main() -> int:
    with (
        tempfile.TemporaryDirectory(prefix="tlsproxy-embed-") as storage,
        socket.create_server(("127.0.0.1", 0)) as app_socket,
    ):
        app_port: int = app_socket.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                proxy_headers=True,
                forwarded_allow_ips="127.0.0.1",  # the proxy's address, as the app sees it
            )
        )
        async with asyncio.TaskGroup() as tasks:
            serving = tasks.create_task(server.serve(sockets=[app_socket]))
            try:
                while not server.started:
                    if serving.done():
                        return 1
                    await asyncio.sleep(0.01)
                async with Proxy(proxy_config(app_port, Path(storage))) as proxy:
                    root = Path(storage, "ca", "root.pem")
                    status, body = await asyncio.to_thread(get, proxy.port("https"), root)
            finally:
                server.should_exit = True
    print(status)
    print(body)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
