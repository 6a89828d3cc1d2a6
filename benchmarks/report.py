"""Turning runs into what people read: medians per contender and workload, ratios to ours,
a console table, results.json, results.md and PNG plots."""

from __future__ import annotations

import json
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
    workload: str  # a workload key, or "idle"
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
    Headline("idle TLS connection", "idle", "kib_per_conn", "KiB per connection", False),
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


def headline_values(
    summary: Summary, idle: dict[str, Metrics], contenders: Sequence[str]
) -> list[tuple[Headline, dict[str, float | None]]]:
    """Each headline with every contender's value (None where it was not measured)."""
    rows = []
    for headline in HEADLINES:
        source = idle if headline.workload == "idle" else summary.get(headline.workload, {})
        if not source:
            continue
        values = {name: source.get(name, {}).get(headline.metric) for name in contenders}
        rows.append((headline, values))
    return rows


def headline_table(
    summary: Summary, idle: dict[str, Metrics], contenders: Sequence[str]
) -> list[list[str]]:
    """Workloads down, contenders across, each peer's cell with its ratio to ours."""
    table = [["workload", "metric", *contenders]]
    for headline, values in headline_values(summary, idle, contenders):
        ours = values.get(OURS)
        cells = [
            f"{number(value)} ({ratio(value, ours)})" if name != OURS and ours else number(value)
            for name, value in values.items()
        ]
        better = "higher" if headline.higher_is_better else "lower"
        table.append([headline.title, f"{headline.unit} ({better} is better)", *cells])
    return table


def detail_table(summary: Summary, workload: str, contenders: Sequence[str]) -> list[list[str]]:
    """One workload: a row per contender, every measured column, ratios to ours."""
    by_contender = summary.get(workload, {})
    ours = by_contender.get(OURS, {})
    ratios = bool(ours) and len(by_contender) > 1
    header = ["proxy"]
    for title, _metric, with_ratio in DETAIL_COLUMNS:
        header += [title, "vs ours"] if with_ratio and ratios else [title]
    rows = [header]
    for name in contenders:
        if name not in by_contender:
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
        text_table(headline_table(result["summary"], result["idle"], contenders)),
    ]
    for key in result["summary"]:
        parts += [
            "",
            f"{workload_title(key)}",
            text_table(detail_table(result["summary"], key, contenders)),
        ]
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
        f"{machine['wrk']}; load average at start {machine['loadavg_start'][0]:.2f}, at end "
        f"{machine.get('loadavg_end', [0.0])[0]:.2f}.",
        "",
        _how(result),
        "",
        "| proxy | version | TLS as negotiated with an OpenSSL client |",
        "|---|---|---|",
    ]
    for name, info in result["contenders"].items():
        lines.append(f"| {name} | {info['version']} | {info['tls']} |")
    lines += [
        "",
        "## Summary",
        "",
        "Medians; a peer's `(nx)` is its value divided by ours.",
        "",
        markdown_table(headline_table(result["summary"], result["idle"], contenders)),
        "",
    ]
    lines += [f"![{plot}]({plot})" for plot in plots]
    for key in result["summary"]:
        lines += ["", f"## {workload_title(key)}", ""]
        lines.append(markdown_table(detail_table(result["summary"], key, contenders)))
    if result["idle"]:
        lines += ["", "## Idle connections", "", _idle_table(result["idle"])]
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def _how(result: dict[str, Any]) -> str:
    """One sentence on pinning and repeats (or on the target, for --target)."""
    settings = result["settings"]
    wrk = f"wrk (`-t1 -c{settings['connections']}`)"
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
    if not plots:
        result["notes"].append("no plots: matplotlib is missing (pip install -e '.[bench]')")
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
    rows = headline_values(result["summary"], result["idle"], contenders)
    if not rows:
        return None
    columns = min(4, len(rows))
    lines = (len(rows) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.6 * lines), squeeze=False)
    colors = [OUR_COLOR if name == OURS else PEER_COLOR for name in contenders]
    for axis, (headline, values) in zip(axes.flat, rows, strict=False):
        bars = axis.bar(contenders, [values.get(name) or 0.0 for name in contenders], color=colors)
        ours = values.get(OURS)
        for bar, name in zip(bars, contenders, strict=True):
            label = ratio(values.get(name), ours) if name != OURS and ours else ""
            label = label or number(values.get(name))
            axis.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        better = "higher" if headline.higher_is_better else "lower"
        axis.set_title(f"{headline.title}\n{headline.unit} ({better} is better)", fontsize=9)
        _style(axis)
    for axis in list(axes.flat)[len(rows) :]:
        axis.set_visible(False)
    figure.suptitle(_caption(result, "bar labels: value divided by ours"), fontsize=10)
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
    figure, axes = plt.subplots(
        1, len(workloads), figsize=(3.6 * len(workloads), 3.6), squeeze=False
    )
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
        axis.set_xticks(positions, contenders)
        axis.set_title(f"{workload_title(key)}\nms (solid p50, light p99)", fontsize=9)
        _style(axis)
    figure.suptitle(_caption(result, "latency seen by wrk, lower is better"), fontsize=10)
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
