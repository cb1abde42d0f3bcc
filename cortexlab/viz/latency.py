"""Latency distributions, and the comparison plots over policies and loads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cortexlab.viz._common import as_requests, metric_label, metric_parts, new_axes

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

_MARKERS = {50: "o", 90: "s", 99: "^"}


def plot_latency_cdf(
    data: Any,
    *,
    metric: str = "ttft",
    ax: Axes | None = None,
    percentiles: Sequence[float] = (50, 99),
    logx: bool = False,
) -> Axes:
    """Empirical CDF of a per-request metric; `data` is a Trace, a requests DataFrame, or a
    dict name -> Trace/DataFrame (one line per policy), with markers at `percentiles`."""
    named = data if isinstance(data, Mapping) else {None: data}
    ax = new_axes(ax, (6, 3.6))
    for i, (name, item) in enumerate(named.items()):
        values = np.sort(as_requests(item, [metric])[metric].dropna().to_numpy(float))
        n = len(values)
        label = f"{name} (n={n})" if name is not None else f"n={n}"
        if n == 0:
            ax.plot([], [], color=f"C{i}", label=label)
            continue
        # Start at (first value, 0) so the curve rises from zero at the smallest value.
        xs, ys = np.r_[values[0], values], np.r_[0.0, np.arange(1, n + 1) / n]
        ax.step(xs, ys, where="post", color=f"C{i}", label=label, gid=f"cdf:{name}")
        for q in percentiles:
            # inverted_cdf picks an observed value, so the marker sits on the curve.
            at = np.percentile(values, q, method="inverted_cdf")
            ax.plot(at, q / 100, _MARKERS.get(q, "D"), color=f"C{i}", ms=6, gid=f"p{q:g}:{name}")
    for q in percentiles:
        ax.plot([], [], _MARKERS.get(q, "D"), color="0.3", label=f"p{q:g}")
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=metric_label(metric), ylabel="fraction of requests", ylim=(0, 1.02))
    ax.set_title(f"{metric_parts(metric)[0]} CDF")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return ax


def plot_goodput_vs_load(
    df: pd.DataFrame,
    *,
    x: str = "rate",
    y: str = "goodput_rps",
    hue: str | None = "scheduler",
    ax: Axes | None = None,
) -> Axes:
    """One line per `hue` value of `y` against `x`, from a sweep's summary (one row per
    configuration; `cl.sweep` with an SLO gives `goodput_rps` and `goodput_share`). Rows
    that share an `x` within a line (several seeds) are drawn as their mean, with the
    band from their min to their max."""
    columns = [c for c in (x, y, hue) if c is not None]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"the sweep table lacks column(s) {missing}; it has {list(df.columns)}")
    ax = new_axes(ax, (6, 3.6))
    groups = df.groupby(hue, sort=False) if hue is not None else [(None, df)]
    for name, group in groups:
        stats = group.groupby(x, sort=True)[y].agg(["mean", "min", "max", "size"])
        (line,) = ax.plot(
            stats.index, stats["mean"], marker="o", label=None if name is None else str(name)
        )
        if (stats["size"] > 1).any():
            ax.fill_between(
                stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.15
            )
    ax.set(xlabel=metric_label(x), ylabel=metric_label(y))
    ax.set_title(f"{metric_parts(y)[0]} vs {metric_parts(x)[0]}")
    ax.grid(alpha=0.3)
    if hue is not None:
        ax.legend(title=hue, fontsize="small")
    return ax


def plot_metric_bars(
    summary: pd.DataFrame,
    *,
    metrics: Sequence[str] = ("ttft_p50", "ttft_p99"),
    ax: Axes | None = None,
) -> Axes:
    """Grouped bars: one group per policy (the index), one bar per metric."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [m for m in metrics if m not in summary.columns]
    if missing:
        raise ValueError(f"summary lacks metric(s) {missing}; it has {list(summary.columns)}")
    ax = new_axes(ax, (max(5, 1.2 * len(summary) * max(1, len(metrics) / 2)), 3.6))
    positions = np.arange(len(summary))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        offset = (j - (len(metrics) - 1) / 2) * width
        ax.bar(positions + offset, summary[metric], width, label=metric_parts(metric)[0])
    ax.set_xticks(positions, [str(i) for i in summary.index])
    units = {metric_parts(m)[1] for m in metrics}
    unit = units.pop() if len(units) == 1 else None
    ax.set(xlabel=summary.index.name or "policy", ylabel=f"value ({unit})" if unit else "value")
    ax.set_title(", ".join(metric_parts(m)[0] for m in metrics))
    ax.legend(fontsize="small")
    return ax
