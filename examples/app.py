"""The example upstream: a FastAPI app that reports what it sees of each request.

Run it behind tlsproxy with uvicorn's proxy-header support so that the client address and
scheme it reports are the real client's:

    uvicorn examples.app:app --port 8000 --proxy-headers --forwarded-allow-ips 127.0.0.1
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

app = FastAPI(title="tlsproxy example app")

CHUNK = 64 * 1024


@app.api_route("/", methods=["GET", "HEAD"])
async def hello(request: Request) -> dict[str, object]:
    """What a FastAPI app behind the proxy sees of the request."""
    return {
        "message": "hello from the example app behind tlsproxy",
        "client": request.client.host if request.client else None,
        "scheme": request.url.scheme,
        "host": request.headers.get("host"),
        "url": str(request.url),
        "url_for": str(request.url_for("hello")),
        "headers": dict(request.headers),
    }


@app.post("/upload")
async def upload(request: Request) -> dict[str, object]:
    """Consume the body as a stream; report its size and digest."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        digest.update(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def pattern(size: int) -> AsyncIterator[bytes]:
    """``size`` bytes of a repeating pattern, produced chunk by chunk."""

    async def chunks() -> AsyncIterator[bytes]:
        block = bytes(range(256)) * (CHUNK // 256)
        left = size
        while left > 0:
            piece = block[: min(CHUNK, left)]
            left -= len(piece)
            yield piece

    return chunks()


@app.get("/download")
async def download(size: int = 1024) -> StreamingResponse:
    """A streamed (chunked) response of ``size`` bytes."""
    return StreamingResponse(pattern(size), media_type="application/octet-stream")


@app.get("/events")
async def events(count: int = 3, interval: float = 0.5) -> StreamingResponse:
    """Server-sent events, one every ``interval`` seconds."""

    async def stream() -> AsyncIterator[bytes]:
        for i in range(count):
            yield f"data: event {i}\n\n".encode()
            await asyncio.sleep(interval)

    return StreamingResponse(stream(), media_type="text/event-stream")


@app.get("/slow")
async def slow(seconds: float = 1.0) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.api_route("/status/{code}", methods=["GET", "HEAD"])
async def status(code: int) -> Response:
    return Response(status_code=code)


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    """Echo text messages back, prefixed with the client address the app sees."""
    await websocket.accept()
    client = websocket.client.host if websocket.client else "?"
    try:
        while True:
            message = await websocket.receive_text()
            await websocket.send_text(f"{client}: {message}")
    except WebSocketDisconnect:
        pass
