"""A FastAPI app for tests that must know every request the app itself answered.

Any method and path is answered 200 with the app's view of that request, and the view is
kept; ``GET /_seen``, asked directly at the app (not through the proxy), lists them all.
Tests assert on this record what no proxy log could show: what really reached the app.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

app = FastAPI(title="tlsproxy test app that records what it sees")
seen: list[dict[str, Any]] = []


@app.get("/_seen")
async def requests_seen() -> list[dict[str, Any]]:
    return seen


@app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def record(request: Request, path: str) -> dict[str, Any]:
    body = await request.body()
    view = {
        "method": request.method,
        "path": "/" + path,
        "query": request.url.query,
        "client": request.client.host if request.client else None,
        "headers": dict(request.headers),
        "body_bytes": len(body),
    }
    seen.append(view)
    return view
