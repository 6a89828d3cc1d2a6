"""Turning runs into what people read: medians per contender and workload, ratios to ours,
their spread over the repeats, the targets, a console table, results.json, results.md and
PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.contenders import OURS
from benchmarks.load import BY_KEY

Metrics = dict[str, float]
Summary = dict[str, dict[str, Metrics]]  # workload -> contender -> median metrics


@dataclass(frozen=True, slots=True)
class Headline:
    """One row of the summary: a workload judged by one metric."""

    title: str
    workload: str  # a workload key, or "idle" / "idle_h2"
    metric: str
    unit: str
    higher_is_better: bool = True


HEADLINES = (
    Headline("keep-alive small GET", "keepalive", "rps", "req/s"),
    Headline("keep-alive small GET", "keepalive", "p99_ms", "p99 ms", higher_is_better=False),
    Headline("keep-alive small GET", "keepalive", "req_per_cpu_s", "req per proxy CPU-s"),
    Headline("new connection, TLS resumed", "close", "req_per_cpu_s", "req per proxy CPU-s"),
    Headline("new connection, full handshake", "handshake", "req_per_cpu_s", "req per proxy CPU-s"),
    Headline("1 MiB responses", "large", "mib_per_cpu_s", "MiB per proxy CPU-s"),
    Headline("100 KiB POST", "post", "req_per_cpu_s", "req per proxy CPU-s"),
    Headline("HTTP/2 small GET", "h2", "p99_ms", "p99 ms", higher_is_better=False),
    Headline("HTTP/2 small GET", "h2", "req_per_cpu_s", "req per proxy CPU-s"),
    Headline("idle TLS connection", "idle", "kib_per_conn", "KiB per connection", False),
    Headline("idle HTTP/2 connection", "idle_h2", "kib_per_conn", "KiB per connection", False),
)
H2_SOURCES = ("h2", "idle_h2")  # where a contender without h2 shows "no h2"
IDLE_SOURCES = ("idle", "idle_h2")


@dataclass(frozen=True, slots=True)
class Target:
    """A goal for ours: ``metric`` of ``workload`` against ``bound``, either as ours alone or
    as ours divided by the ``versus`` peer's value in the same run."""

    title: str
    workload: str
    metric: str
    bound: float
    versus: str | None = None
    at_least: bool = True


TARGETS = (
    Target(
        "HTTP/2 small GET: req per proxy CPU-s >= 1.5x Caddy's h2",
        "h2",
        "req_per_cpu_s",
        1.5,
        versus="caddy",
    ),
    Target("idle HTTP/2 connection <= 48 KiB", "idle_h2", "kib_per_conn", 48.0, at_least=False),
)

DETAIL_COLUMNS = (
    ("req/s", "rps", True),
    ("p50 ms", "p50_ms", False),
    ("p99 ms", "p99_ms", False),
    ("MiB/s", "mib_per_s", False),
    ("CPU s/10k req", "cpu_per_10k", True),
    ("peak RSS MiB", "peak_rss_mib", False),
    ("errors", "errors", False),
)  # (header, metric, followed by a ratio-to-ours column)


def summarize(runs: Sequence[dict[str, Any]]) -> Summary:
    """The median of every metric over the repeats of each (workload, contender)."""
    grouped: dict[str, dict[str, list[Metrics]]] = {}
    for run in runs:
        grouped.setdefault(run["workload"], {}).setdefault(run["contender"], []).append(
            run["metrics"]
        )
    summary: Summary = {}
    for workload, by_contender in grouped.items():
        for contender, samples in by_contender.items():
            names = set.intersection(*(set(sample) for sample in samples))
            summary.setdefault(workload, {})[contender] = {
                name: statistics.median(sample[name] for sample in samples)
                for name in sorted(names)
            }
    return summary


def number(value: float | None) -> str:
    """Readable at a glance: thousands separated, two significant decimals for small values."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(value: float | None, ours: float | None) -> str:
    """The peer's value divided by ours, e.g. ``5.2x`` (blank for ours or without data)."""
    if value is None or not ours:
        return "-"
    return f"{value / ours:.2f}x"


def _source(result: dict[str, Any], workload: str) -> dict[str, Metrics]:
    """Per contender medians of a workload, or the idle measurements (older results.json
    files have no ``idle_h2``)."""
    if workload in IDLE_SOURCES:
        idle: dict[str, Metrics] = result.get(workload, {})
        return idle
    summary: Summary = result["summary"]
    return summary.get(workload, {})


def headline_values(
    result: dict[str, Any], contenders: Sequence[str]
) -> list[tuple[Headline, dict[str, float | None]]]:
    """Each headline with every contender's value (None where it was not measured)."""
    rows = []
    for headline in HEADLINES:
        source = _source(result, headline.workload)
        if not source:
            continue
        values = {name: source.get(name, {}).get(headline.metric) for name in contenders}
        rows.append((headline, values))
    return rows


def missing(result: dict[str, Any], workload: str, name: str) -> str:
    """What an empty cell says: "no h2" for a contender that did not negotiate h2."""
    if workload in H2_SOURCES and name in result.get("no_h2", {}):
        return "no h2"
    return number(None)


def error_runs(result: dict[str, Any], workload: str, name: str) -> tuple[int, int]:
    """(runs with any error, runs) of one contender in one workload."""
    runs = [r for r in result["runs"] if r["workload"] == workload and r["contender"] == name]
    return sum(1 for r in runs if r["metrics"].get("errors", 0) > 0), len(runs)


def spread(result: dict[str, Any], workload: str, name: str, metric: str) -> tuple[float, float]:
    """(min, max) of a metric over one contender's repeats of a workload; (nan, nan) if none."""
    values = [
        r["metrics"][metric]
        for r in result["runs"]
        if r["workload"] == workload and r["contender"] == name and metric in r["metrics"]
    ]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def headline_table(result: dict[str, Any], contenders: Sequence[str]) -> list[list[str]]:
    """Workloads down, contenders across, each peer's cell with its ratio to ours; a cell
    whose runs had errors says in how many."""
    table = [["workload", "metric", *contenders]]
    for headline, values in headline_values(result, contenders):
        ours = values.get(OURS)
        cells = []
        for name, value in values.items():
            if value is None:
                cells.append(missing(result, headline.workload, name))
                continue
            cell = number(value)
            if name != OURS and ours:
                cell += f" ({ratio(value, ours)})"
            failed, runs = error_runs(result, headline.workload, name)
            if failed:
                cell += f" [errors in {failed}/{runs} runs]"
            cells.append(cell)
        better = "higher" if headline.higher_is_better else "lower"
        table.append([headline.title, f"{headline.unit} ({better} is better)", *cells])
    return table


def per_cpu_metric(workload: str) -> str:
    """The per proxy CPU-second figure of a workload: MiB for 1 MiB bodies, else requests."""
    return "mib_per_cpu_s" if workload == "large" else "req_per_cpu_s"


def target_rows(result: dict[str, Any]) -> list[list[str]]:
    """Each target with ours' value (or ratio to the peer, and its per-round range) and a
    verdict: met, not met, or why it could not be judged."""
    rows = [["target", "measured", "verdict"]]
    for target in TARGETS:
        source = _source(result, target.workload)
        ours = source.get(OURS, {}).get(target.metric)
        if ours is None:
            why = f"not measured (ours: {missing(result, target.workload, OURS)})"
            peer = source.get(target.versus or "", {}).get(target.metric)
            if peer:  # what ours would have needed in this run
                sign = ">=" if target.at_least else "<="
                why += f"; in this run: {sign} {number(target.bound * peer)}"
            rows.append([target.title, "-", why])
            continue
        value, shown = ours, number(ours)
        if target.versus is not None:
            peer = source.get(target.versus, {}).get(target.metric)
            if not peer:
                why = f"{target.versus}: {missing(result, target.workload, target.versus)}"
                if target.versus not in result["contenders"]:
                    why = f"{target.versus} not in this run"
                rows.append([target.title, "-", f"not measured ({why})"])
                continue
            value = ours / peer
            rounds = round_ratios(result, target.workload, target.metric, target.versus)
            shown = f"{value:.2f}x"
            if len(rounds) > 1:
                shown += f" (per round {min(rounds):.2f}-{max(rounds):.2f}x)"
        met = value >= target.bound if target.at_least else value <= target.bound
        rows.append([target.title, shown, "met" if met else "not met"])
    return rows


def round_ratios(result: dict[str, Any], workload: str, metric: str, peer: str) -> list[float]:
    """Ours divided by ``peer`` within each repeat (they ran back to back)."""
    by_repeat: dict[int, dict[str, float]] = {}
    for run in result["runs"]:
        if run["workload"] == workload and metric in run["metrics"]:
            by_repeat.setdefault(run["repeat"], {})[run["contender"]] = run["metrics"][metric]
    return [
        values[OURS] / values[peer]
        for _repeat, values in sorted(by_repeat.items())
        if values.get(OURS) and values.get(peer)
    ]


def detail_table(
    result: dict[str, Any], workload: str, contenders: Sequence[str]
) -> list[list[str]]:
    """One workload: a row per contender, every measured column, ratios to ours, the per
    proxy CPU-second figure with its range over the repeats; a contender that did not
    negotiate h2 gets a row saying so in the h2 table."""
    by_contender = result["summary"].get(workload, {})
    ours = by_contender.get(OURS, {})
    ratios = bool(ours) and len(by_contender) > 1
    per_cpu = per_cpu_metric(workload)
    unit = "MiB" if per_cpu == "mib_per_cpu_s" else "req"
    header = ["proxy"]
    for title, _metric, with_ratio in DETAIL_COLUMNS:
        header += [title, "vs ours"] if with_ratio and ratios else [title]
    header.append(f"{unit} per CPU-s (min-max of the runs)")
    rows = [header]
    no_h2 = result.get("no_h2", {}) if workload in H2_SOURCES else {}
    for name in contenders:
        if name not in by_contender:
            if name in no_h2:
                rows.append([name, no_h2[name], *[""] * (len(header) - 2)])
            continue
        values = by_contender[name]
        row = [name]
        for _title, metric, with_ratio in DETAIL_COLUMNS:
            value = values.get(metric)
            row.append(
                f"{value:.0f}" if metric == "errors" and value is not None else number(value)
            )
            if with_ratio and ratios:
                row.append("" if name == OURS else ratio(values.get(metric), ours.get(metric)))
        low, high = spread(result, workload, name, per_cpu)
        cell = number(values.get(per_cpu))
        same = math.isnan(low) or low == high
        row.append(cell if same else f"{cell} ({number(low)}-{number(high)})")
        rows.append(row)
    return rows


def text_table(rows: list[list[str]]) -> str:
    """Aligned columns for the console: first column left, numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    """A GitHub table of the same rows, numbers right-aligned."""
    align = ["---"] + ["---:"] * (len(rows[0]) - 1)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join(align) + " |")
    return "\n".join(lines)


def console_report(result: dict[str, Any]) -> str:
    """Everything the console shows at the end of a run."""
    contenders = list(result["contenders"])
    parts = [
        "Summary (medians; (nx) = that proxy's value divided by ours)",
        text_table(headline_table(result, contenders)),
    ]
    for key in result["summary"]:
        parts += [
            "",
            f"{workload_title(key)}",
            text_table(detail_table(result, key, contenders)),
        ]
    if _judged(result):
        parts += ["", "Targets", text_table(target_rows(result))]
    for note in result["notes"]:
        parts.append(f"note: {note}")
    return "\n".join(parts)


def workload_title(key: str) -> str:
    """The heading of a workload's detail table."""
    workload = BY_KEY.get(key)
    return workload.title if workload else key


def markdown_report(result: dict[str, Any], plots: Sequence[str]) -> str:
    """results.md: how the numbers were made, the summary, the details, the notes."""
    machine = result["machine"]
    contenders = list(result["contenders"])
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{result['command']}` ({result['started']}, mode {result['mode']}).",
        "",
        f"Machine: {machine['nproc']} cores ({machine['cpu_model']}), {machine['os']}, "
        f"kernel {machine['kernel']}, Python {machine['python']}, uvloop {machine['uvloop']}, "
        f"{machine['wrk']}{_h2load_version(machine)}; load average at start "
        f"{machine['loadavg_start'][0]:.2f}, at end "
        f"{machine.get('loadavg_end', [0.0])[0]:.2f}.",
        "",
        _how(result),
        "",
        "| proxy | version | TLS as negotiated with an OpenSSL client | ALPN, offered h2 and "
        "http/1.1 |",
        "|---|---|---|---|",
    ]
    for name, info in result["contenders"].items():
        alpn = info.get("alpn") or "-"
        lines.append(f"| {name} | {info['version']} | {info['tls']} | {alpn} |")
    lines += [
        "",
        "## Summary",
        "",
        "Medians; a peer's `(nx)` is its value divided by ours; `no h2`: ALPN did not pick h2 "
        "(not measured over HTTP/1.1 instead); `[errors in n/N runs]`: the load generator "
        "counted failed requests in that many runs.",
        "",
        markdown_table(headline_table(result, contenders)),
        "",
    ]
    lines += [f"![{plot}]({plot})" for plot in plots]
    if _judged(result):
        lines += ["", "## Targets", "", markdown_table(target_rows(result))]
    for key in result["summary"]:
        lines += ["", f"## {workload_title(key)}", ""]
        lines.append(markdown_table(detail_table(result, key, contenders)))
        negotiated = _h2load_tls(result, key)
        if negotiated:
            lines += ["", f"TLS as h2load negotiated it: {negotiated}."]
    if result["idle"]:
        lines += ["", "## Idle connections", "", _idle_table(result["idle"])]
    if result.get("idle_h2"):
        lines += [
            "",
            "## Idle HTTP/2 connections",
            "",
            "Each connection negotiated h2 by ALPN and completed one GET on stream 1.",
            "",
            _idle_table(result["idle_h2"]),
        ]
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def _h2load_version(machine: dict[str, Any]) -> str:
    """ ", h2load nghttp2/1.52.0" when the run had it (older results.json files do not)."""
    version = machine.get("h2load", "none")
    return "" if version in ("none", "unknown") else f", {version}"


def _judged(result: dict[str, Any]) -> bool:
    """Whether any target's workload was part of this run (never for --target: no ours)."""
    return result.get("mode") != "target" and any(
        _source(result, target.workload) or (target.workload in settings_workloads(result))
        for target in TARGETS
    )


def settings_workloads(result: dict[str, Any]) -> list[str]:
    """The workloads asked for, with the idle measurements each implies."""
    keys: list[str] = list(result["settings"].get("workloads", []))
    return [*keys, "idle_h2"] if "h2" in keys else keys


def _h2load_tls(result: dict[str, Any], workload: str) -> str:
    """The TLS version and cipher h2load saw per contender (h2 runs record them)."""
    seen: dict[str, str] = {}
    for run in result["runs"]:
        if run["workload"] == workload and run.get("tls"):
            seen.setdefault(run["contender"], run["tls"])
    return ", ".join(f"{name} {tls}" for name, tls in seen.items())


def _how(result: dict[str, Any]) -> str:
    """One sentence on pinning and repeats (or on the target, for --target)."""
    settings = result["settings"]
    wrk = f"wrk (`-t1 -c{settings['connections']}`)"
    if "h2" in settings.get("workloads", []):
        wrk += (
            f" and h2load (`-t1 -c{settings.get('h2_connections', 8)} "
            f"-m{settings.get('h2_streams', 16)}`, HTTP/2)"
        )
    if result["mode"] == "target":
        return f"{wrk} against {settings['target']}, {settings['duration']} s per workload."
    return (
        f"Each proxy pinned to core {settings['proxy_core']} with one worker; the upstream "
        f"(nginx) and {wrk} pinned to core {settings['load_core']}; {settings['duration']} s "
        f"per run, median of {settings['repeat']} run(s), contenders alternated within each "
        "repeat."
    )


def _idle_table(idle: dict[str, Metrics]) -> str:
    """How many idle connections each proxy held and what they cost."""
    rows = [["proxy", "connections", "RSS before MiB", "RSS with them MiB", "KiB per connection"]]
    for name, values in idle.items():
        rows.append(
            [
                name,
                f"{values['opened']:.0f} of {values['asked']:.0f}",
                number(values["rss_before_mib"]),
                number(values["rss_after_mib"]),
                number(values["kib_per_conn"]),
            ]
        )
    return markdown_table(rows)


def write_outputs(result: dict[str, Any], directory: Path) -> list[Path]:
    """results.json, the plots (when matplotlib is there) and results.md."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "results.json"]
    written[0].write_text(json.dumps(result, indent=2) + "\n")
    plots = plot(result, directory)
    no_plots = "no plots: matplotlib is missing (pip install -e '.[bench]')"
    if (no_plots in result["notes"]) == bool(plots):  # a --render with matplotlib: drop it
        if plots:
            result["notes"].remove(no_plots)
        else:
            result["notes"].append(no_plots)
        written[0].write_text(json.dumps(result, indent=2) + "\n")
    markdown = directory / "results.md"
    markdown.write_text(markdown_report(result, [path.name for path in plots]))
    return [*written, *plots, markdown]


def plot(result: dict[str, Any], directory: Path) -> list[Path]:
    """summary.png and latency.png; none when matplotlib is missing (CI need not have it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return []
    paths = [_plot_summary(result, directory / "summary.png")]
    paths.append(_plot_latency(result, directory / "latency.png"))
    return [path for path in paths if path is not None]


def _plot_summary(result: dict[str, Any], path: Path) -> Path | None:
    """A bar chart per headline metric, ours highlighted, ratios to ours on the bars."""
    import matplotlib.pyplot as plt

    contenders = list(result["contenders"])
    rows = headline_values(result, contenders)
    if not rows:
        return None
    columns = min(4, len(rows))
    lines = (len(rows) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.6 * lines), squeeze=False)
    colors = [OUR_COLOR if name == OURS else PEER_COLOR for name in contenders]
    for axis, (headline, values) in zip(axes.flat, rows, strict=False):
        heights = [values.get(name) or 0.0 for name in contenders]
        bars = axis.bar(contenders, heights, color=colors)
        above = [0.0] * len(contenders)
        if headline.workload not in IDLE_SOURCES:  # min-max over the repeats
            ranges = [
                spread(result, headline.workload, name, headline.metric) for name in contenders
            ]
            below = [
                0.0 if math.isnan(low) else max(0.0, h - low)
                for h, (low, _) in zip(heights, ranges, strict=True)
            ]
            above = [
                0.0 if math.isnan(high) else max(0.0, high - h)
                for h, (_, high) in zip(heights, ranges, strict=True)
            ]
            shown = [i for i, name in enumerate(contenders) if values.get(name) is not None]
            axis.errorbar(
                [contenders[i] for i in shown],
                [heights[i] for i in shown],
                yerr=[[below[i] for i in shown], [above[i] for i in shown]],
                fmt="none",
                ecolor="black",
                elinewidth=0.8,
                capsize=2,
            )
        ours = values.get(OURS)
        for bar, name, whisker in zip(bars, contenders, above, strict=True):
            label = ratio(values.get(name), ours) if name != OURS and ours else ""
            if values.get(name) is None:
                label = missing(result, headline.workload, name)
            label = label or number(values.get(name))
            axis.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height() + whisker),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        better = "higher" if headline.higher_is_better else "lower"
        axis.set_title(f"{headline.title}\n{headline.unit} ({better} is better)", fontsize=9)
        _style(axis)
    for axis in list(axes.flat)[len(rows) :]:
        axis.set_visible(False)
    figure.suptitle(
        _caption(result, "bar labels: value divided by ours; whiskers: min-max of the runs"),
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_latency(result: dict[str, Any], path: Path) -> Path | None:
    """p50 and p99 latency of every workload, one panel each, contenders side by side."""
    import matplotlib.pyplot as plt

    contenders = list(result["contenders"])
    workloads = list(result["summary"])
    if not workloads:
        return None
    width = max(3.6 * len(workloads), 11.0)  # room for the caption above a single panel
    figure, axes = plt.subplots(1, len(workloads), figsize=(width, 3.6), squeeze=False)
    positions = list(range(len(contenders)))
    for axis, key in zip(axes.flat, workloads, strict=True):
        values = result["summary"][key]
        for offset, metric, alpha in ((-0.2, "p50_ms", 1.0), (0.2, "p99_ms", 0.45)):
            heights = [values.get(name, {}).get(metric, 0.0) for name in contenders]
            axis.bar(
                [x + offset for x in positions],
                heights,
                width=0.4,
                color=[OUR_COLOR if n == OURS else PEER_COLOR for n in contenders],
                alpha=alpha,
                label=metric.removesuffix("_ms"),
            )
        for x, name in zip(positions, contenders, strict=True):
            if name not in values and missing(result, key, name) != "-":
                axis.annotate("no h2", (x, 0.0), ha="center", va="bottom", fontsize=8)
        axis.set_xticks(positions, contenders)
        axis.set_title(f"{workload_title(key)}\nms (solid p50, light p99)", fontsize=9)
        _style(axis)
    figure.suptitle(_caption(result, "latency seen by wrk or h2load, lower is better"), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


OUR_COLOR = "#d62728"
PEER_COLOR = "#7f7f7f"


def _style(axis: Any) -> None:
    """Small tick labels, rotated names, room above the bars for their labels."""
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    axis.tick_params(axis="y", labelsize=8)
    axis.margins(y=0.15)


def _caption(result: dict[str, Any], what: str) -> str:
    """The figure title: how the numbers were made, on what machine."""
    settings, machine = result["settings"], result["machine"]
    return (
        f"{what}; each proxy on one core; median of {settings['repeat']} run(s) of "
        f"{settings['duration']} s; {machine['nproc']} cores {machine['cpu_model']}; "
        f"{result['started']}"
    )
