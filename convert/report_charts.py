"""The report's charts: matplotlib (Agg, no display) figures as SVG data: URIs, stable bytes for the same data.

    charts = run_charts(run, scan)          # {"reasons", "throughput", "sources"}: a data: URI or None
    column_chart(stats)                     # one column's histogram (numbers, text lengths, true/false)

Pure rendering of what `convert.report_data` gathered; `convert.report` puts them on the page.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from typing import Any

import numpy as np

from .ledger import RunView
from .report_data import BYTES_BINS_PER_OCTAVE, ColumnStats, Scan, SourceStats


def run_charts(run: RunView, scan: Scan) -> dict[str, str | None]:
    """The run's charts: failure reasons, items/s over the run, source statistics (None: no data)."""
    charts: dict[str, str | None] = dict.fromkeys(("reasons", "throughput", "sources"))
    reasons = [(k, v) for k, v in scan.by_status.most_common() if k != "ok"]
    if reasons:
        charts["reasons"] = _bar_chart(reasons, "failed items by reason")
    timing = [(s["started"], s["finished"], s["count"]) for s in run.shards if s.get("started") and s.get("finished")]
    if timing:
        charts["throughput"] = _throughput_chart(timing)
    if scan.sources.known or scan.sources.formats or scan.sources.bytes_bin:
        charts["sources"] = _source_charts(scan.sources)
    return charts


def _figure(*shape: int, size: tuple[float, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.hashsalt"] = "convert-report"  # stable ids: same data, same bytes
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(*shape) if shape else fig.subplots()


def _svg(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def _bar_chart(pairs: list[tuple[str, int]], title: str) -> str:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(size=(6.4, 1.1 + 0.3 * len(pairs)))
    names, counts = [p[0] for p in pairs][::-1], [p[1] for p in pairs][::-1]
    ax.barh(names, counts, color="#c0392b")
    for y, count in enumerate(counts):
        ax.annotate(f" {count:,}", (count, y), va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("items")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.15)
    return _svg(fig)


def _throughput_chart(timing: list[tuple[float, float, int]]) -> str:
    """Items/s over the run (items of each shard spread over its own start..finish) and each
    shard's duration at its finish time, so stragglers and slow phases stand out."""
    t0 = min(t[0] for t in timing)
    end = max(t[1] for t in timing) - t0
    edges = np.linspace(0.0, max(end, 1e-3), min(60, max(8, len(timing))) + 1)
    rate = np.zeros(len(edges) - 1)
    for start, finish, count in timing:
        a, b = start - t0, max(finish - t0, start - t0 + 1e-6)
        overlap = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)
        rate += count * overlap / (b - a)
    rate /= np.diff(edges)
    fig, (ax1, ax2) = _figure(1, 2, size=(9.6, 3.0))
    ax1.stairs(rate, edges, fill=True, color="#2e86c1")
    ax1.set(title="items/s over the run", xlabel="seconds since the first shard started", ylabel="items/s")
    ax2.scatter([t[1] - t0 for t in timing], [t[1] - t[0] for t in timing], s=12, color="#884ea0")
    ax2.set(title="shard duration at its finish", xlabel="finished at (s)", ylabel="seconds")
    for ax in (ax1, ax2):
        ax.title.set_fontsize(10)
    return _svg(fig)


def _source_charts(stats: SourceStats) -> str:
    fig, axes = _figure(1, 5, size=(12.8, 2.8))
    for ax, counter, title in (
        (axes[0], stats.width, "width (px)"),
        (axes[1], stats.height, "height (px)"),
        (axes[2], stats.aspect, "aspect ratio (w/h)"),
    ):
        _hist(ax, counter, title)
    sizes = Counter({2 ** (b / BYTES_BINS_PER_OCTAVE) / 1024: n for b, n in stats.bytes_bin.items()})
    _hist(axes[3], sizes, "source size (KiB, log)", log=True)
    formats = stats.formats.most_common(8)
    axes[4].bar([f for f, _ in formats], [n for _, n in formats], color="#16a085")
    axes[4].set_title("source format", fontsize=10)
    _integer_counts(axes[4])
    return _svg(fig)


def _hist(ax: Any, counter: Counter[Any], title: str, log: bool = False) -> None:
    ax.set_title(title, fontsize=10)
    if not counter:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="#888")
        return
    values, weights = list(counter.keys()), list(counter.values())
    lo, hi = min(values), max(values)
    if log and lo > 0:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        bins: Any = np.geomspace(lo / 1.2, hi * 1.2, 24)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        bins = np.linspace(lo - 0.5, hi + 0.5, 24) if hi > lo else [lo - 0.5, lo + 0.5]
    ax.hist(values, bins=bins, weights=weights, color="#16a085")
    _integer_counts(ax)


def _integer_counts(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def column_chart(stats: ColumnStats) -> str | None:
    """One column's histogram: its values (numbers), its lengths in characters (text) or its
    true/false counts (bool); None when it holds no value to draw."""
    if not stats.values:
        return None
    fig, ax = _figure(size=(3.9, 2.4))
    if stats.type == "string":
        _hist(ax, stats.lengths, f"{stats.name}: length (characters)")
    elif stats.type == "bool":
        ax.bar(["false", "true"], [stats.values - stats.true, stats.true], color="#16a085")
        ax.set_title(f"{stats.name}: values", fontsize=10)
        _integer_counts(ax)
    else:
        data = stats.sample[np.isfinite(stats.sample)]
        if not data.size:
            return None
        lo, hi = float(data.min()), float(data.max())
        bins: Any = 24 if hi > lo else [lo - 0.5, hi + 0.5]
        if stats.type == "int64" and hi - lo < 24:
            bins = np.arange(lo - 0.5, hi + 1.5)
        ax.hist(data, bins=bins, weights=np.full(data.size, float(stats.stride)), color="#16a085")
        ax.set_title(f"{stats.name}: values" + (" (sampled)" if stats.stride > 1 else ""), fontsize=10)
        _integer_counts(ax)
    ax.set_ylabel("items")
    return _svg(fig)
