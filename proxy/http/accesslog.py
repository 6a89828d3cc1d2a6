"""One line per request, as text (close to nginx's combined format) or JSON."""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

log = logging.getLogger("tlsproxy.access")


class AccessLog:
    """Writes access lines to the ``tlsproxy.access`` logger in the configured format."""

    def __init__(self, fmt: Literal["text", "json"]) -> None:
        self._json = fmt == "json"

    def request(
        self,
        client: str,
        method: bytes,
        target: bytes,
        version: bytes,
        status: int,
        sent: int,
        seconds: float,
        site: str,
        upstream: str,
    ) -> None:
        if self._json:
            log.info(
                json.dumps(
                    {
                        "time": time.time(),
                        "client": client,
                        "method": method.decode("latin-1"),
                        "target": target.decode("latin-1"),
                        "version": version.decode("latin-1"),
                        "status": status,
                        "bytes": sent,
                        "duration": round(seconds, 6),
                        "site": site,
                        "upstream": upstream,
                    },
                    separators=(",", ":"),
                )
            )
        else:
            log.info(
                '%s %s "%s %s HTTP/%s" %d %d %.3fs site=%s upstream=%s',
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                client,
                method.decode("latin-1"),
                target.decode("latin-1"),
                version.decode("latin-1"),
                status,
                sent,
                seconds,
                site or "-",
                upstream or "-",
            )
