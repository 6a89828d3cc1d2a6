"""A strict little parser for the Prometheus text format (0.0.4), and a scrape helper.

Strict on purpose: every sample must belong to a metric announced by ``# TYPE`` (histogram
samples by their ``_bucket``/``_sum``/``_count`` suffix), label values must be quoted and
correctly escaped, values must be floats, and no series may appear twice.
"""

from __future__ import annotations

import http.client
import math
import re
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\["\\n])*)"\s*(,|$)')

Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[Key, float] = field(default_factory=dict)

    def value(self, metric: str, /, **labels: str) -> float:
        """One sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((metric, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def parse(text: str) -> Exposition:
    out = Exposition()
    assert text.endswith("\n"), "the exposition ends with a newline"
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help = line[7:].partition(" ")
            out.helps[name] = help
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}, line
            assert name not in out.types, f"{name} announced twice"
            out.types[name] = kind
        elif line.startswith("#") or not line:
            continue
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, _, body, raw = match.groups()
            labels = _labels(body or "")
            family = _family(name, out.types)
            assert family is not None, f"{name} has no # TYPE line before it"
            value = float(raw)  # accepts +Inf, -Inf, NaN
            key = (name, frozenset(labels.items()))
            assert key not in out.samples, f"series repeated: {line!r}"
            out.samples[key] = value
    _check_histograms(out)
    return out


def _labels(body: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(body):
        match = _LABEL.match(body, position)
        assert match, f"bad labels: {body!r}"
        name, raw, _ = match.groups()
        assert name not in labels, f"label {name} repeated"
        labels[name] = raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        position = match.end()
    return labels


def _family(name: str, types: dict[str, str]) -> str | None:
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return base
    return None


def _check_histograms(out: Exposition) -> None:
    """Buckets are cumulative, end at +Inf, and +Inf equals _count."""
    for name, kind in out.types.items():
        if kind != "histogram":
            continue
        groups: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for labels, value in out.series(f"{name}_bucket").items():
            rest = frozenset((k, v) for k, v in labels if k != "le")
            le = dict(labels)["le"]
            groups.setdefault(rest, []).append((float(le), value))
        for rest, buckets in groups.items():
            buckets.sort()
            counts = [count for _, count in buckets]
            assert counts == sorted(counts), f"{name} buckets not cumulative"
            assert buckets[-1][0] == math.inf, f"{name} has no +Inf bucket"
            assert out.samples[(f"{name}_count", rest)] == counts[-1]
            assert (f"{name}_sum", rest) in out.samples


def scrape(port: int, path: str = "/metrics") -> tuple[str, Exposition]:
    """GET the admin listener's metrics; returns the content type and the parsed page."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, (response.status, body)
        return response.getheader("content-type") or "", parse(body)
    finally:
        connection.close()
