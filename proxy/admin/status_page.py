"""The admin status page: server-rendered HTML from the :mod:`proxy.admin.status` document.

Every value goes through :func:`html.escape` (site names, upstream errors and CA error
messages are untrusted text), and the answer carries a Content-Security-Policy without any
script source, so even a missed escape could not run a script. The page reloads itself with
a meta refresh: no JavaScript at all. States are words with a symbol, colour only helps.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any

from proxy.plain.server import Answer

REFRESH_SECONDS = 10
SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
)

# state -> (symbol, CSS class); the class picks a colour, the word and symbol carry the meaning
_BADGES = {
    "ok": ("✔", "good"),
    "up": ("✔", "good"),
    "renewing": ("↻", "info"),
    "degraded": ("▲", "warn"),
    "expiring soon": ("▲", "warn"),
    "failing": ("✖", "bad"),
    "down": ("✖", "bad"),
    "expired": ("✖", "bad"),
}

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:.3em .5em;
text-align:left;vertical-align:top}th{background:#f2f2f2}
.badge{display:inline-block;padding:0 .4em;border-radius:3px;font-weight:bold;white-space:nowrap}
.good{background:#d7f5dd;color:#0b5a1c}.info{background:#dbe9ff;color:#0b3d91}
.warn{background:#fff1c2;color:#6b4e00}.bad{background:#ffd9d6;color:#8a1207}
.error{font-family:monospace;white-space:pre-wrap;word-break:break-word;color:#8a1207}
.muted{color:#555}ul{margin:0;padding-left:1.1em}
"""


def json_answer(document: dict[str, Any]) -> Answer:
    body = json.dumps(document, indent=2).encode()
    return Answer(200, body, SECURITY_HEADERS, b"application/json")


def html_answer(document: dict[str, Any]) -> Answer:
    return Answer(200, render(document).encode(), SECURITY_HEADERS, b"text/html; charset=utf-8")


def render(document: dict[str, Any]) -> str:
    """The whole page; every interpolated value is escaped by :func:`_e` or :func:`_badge`."""
    sites = document["sites"]
    certificates = document["certificates"]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        "<title>tlsproxy status</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>tlsproxy status</h1>"
        f"<p id=summary>{_summary(sites, certificates)}</p>"
        f"<p class=muted>Generated {_e(document['generated_at'])} by process "
        f"{_e(document['pid'])} ({_e(document['scope'])}; workers: {_e(document['workers'])}). "
        f"Reloads every {REFRESH_SECONDS} s. JSON: <a href=/api/status>/api/status</a>.</p>"
        f"<p id=protocols>{_protocols(document.get('protocols', {}))}</p>"
        f"<h2>Sites ({len(sites)})</h2>{_sites_table(sites)}"
        f"<h2>Certificates ({len(certificates)})</h2>{_certificates_table(certificates)}"
        "</body></html>"
    )


def _protocols(counts: dict[str, int]) -> str:
    """Requests answered per client protocol, e.g. "HTTP/1.1: 120 · HTTP/2.0: 4,310"."""
    if not counts:
        return "No request answered yet."
    shown = " · ".join(f"{_e(protocol)}: {count:,}" for protocol, count in counts.items())
    return f"Requests by protocol: {shown}"


def _sites_table(sites: list[dict[str, Any]]) -> str:
    columns = ["Site", "State", "Hosts", "Upstreams", "Requests", "5xx (share)", "Rate"]
    head = _row("th", [*columns, "Upstream errors"])
    return f"<table id=sites>{head}{''.join(_site_row(s) for s in sites)}</table>"


def _site_row(site: dict[str, Any]) -> str:
    requests = site["requests"]
    share = requests["error_share"]
    rate, error_rate = requests["rate_per_s"], requests["error_rate_per_s"]
    source = site.get("source", "file")
    cells = [
        _e(site["name"])
        + ("" if source == "file" else f"<br><span class=muted>{_e(source)}</span>"),
        _badge(site["state"]),
        _list(_e(h) for h in site["hosts"]),
        _list(_upstream(u) for u in site["upstreams"]),
        _e(requests["total"]),
        _e(requests["errors_5xx"]) + (f" ({share:.1%})" if share is not None else ""),
        "after the next reload" if rate is None else f"{rate:.2f}/s, 5xx {error_rate:.2f}/s",
        _e(", ".join(f"{k}: {v}" for k, v in site["upstream_errors"].items()) or "none"),
    ]
    return f"<tr data-site='{_e(site['name'])}'>{''.join(f'<td>{c}</td>' for c in cells)}</tr>"


def _summary(sites: list[dict[str, Any]], certificates: list[dict[str, Any]]) -> str:
    """One line that says whether anything needs a look, worst first."""
    problems = [
        f"{_badge(s['state'])} site {_e(s['name'])}" for s in sites if s["state"] != "up"
    ] + [
        f"{_badge(c['state'])} certificate {_e(c['site'])}"
        for c in certificates
        if c["state"] != "ok"
    ]
    return "Needs a look: " + ", ".join(problems) if problems else _badge("ok") + " all good"


def _upstream(upstream: dict[str, Any]) -> str:
    text = f"{_e(upstream['url'])} {_badge(upstream['state'])}"
    if upstream["state"] == "failing":
        text += (
            f" since {_e(upstream['failing_since'])}:"
            f" <span class=error>{_e(upstream['last_error'])}</span>"
        )
    return text


def _certificates_table(certificates: list[dict[str, Any]]) -> str:
    head = _row(
        "th",
        ["Names", "State", "Issuer", "Valid", "Next renewal", "Last attempt", "Last error"],
    )
    rows = "".join(_certificate_row(c) for c in certificates)
    return f"<table id=certificates>{head}{rows}</table>"


def _certificate_row(cert: dict[str, Any]) -> str:
    valid = (
        f"{_e(cert['not_before'] or '-')} → {_e(cert['not_after'] or '-')}<br>"
        f"<b class=countdown>{_e(cert['expires_in'])}</b>"
    )
    issuer = _e(cert["issuer"])
    if cert["source"]:
        issuer += f"<br><span class=muted>{_e(cert['source'])}</span>"
    attempt = _e(cert["last_attempt"] or "-")
    if cert["failures"]:
        attempt += f"<br>{_e(cert['failures'])} failure(s) in a row"
    if cert["next_attempt"]:
        attempt += f"<br>next attempt {_e(cert['next_attempt'])}"
    error = cert["last_error"]
    cells = [
        _list(_e(n) for n in cert["names"]),
        _badge(cert["state"]),
        issuer,
        valid,
        _e(cert["next_renewal"]),
        attempt,
        f"<span class=error>{_e(error)}</span>" if error else "none",
    ]
    return f"<tr data-site='{_e(cert['site'])}'>{''.join(f'<td>{c}</td>' for c in cells)}</tr>"


def _badge(state: str) -> str:
    symbol, css = _BADGES.get(state, ("?", "warn"))
    return f"<span class='badge {css}'>{symbol} {_e(state.upper())}</span>"


def _row(cell: str, values: Iterable[str]) -> str:
    return "<tr>" + "".join(f"<{cell}>{_e(v)}</{cell}>" for v in values) + "</tr>"


def _list(items: Iterable[str]) -> str:
    """Items that are already escaped HTML."""
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
