"""Shared plumbing for the plots: input coercion, request order and colours, labels, axes."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib.colors as mcolors
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.patches import Patch

# Dark tab20 colours first, then the light ones: neighbours in arrival order differ clearly.
_TAB20 = colormaps["tab20"].colors
REQUEST_PALETTE: tuple = tuple(_TAB20[0::2]) + tuple(_TAB20[1::2])

# One colour per kind of KV slot (`cortexlab.metrics.KV_PARTS`), the same in every KV plot.
KV_COLORS = {
    "holding": "C0",
    "reserved": "#9ecae1",
    "internal": "C1",
    "cached": "#a1d99b",
    "external": "#de2d26",
    "free": "0.88",
}
KV_LABELS = {
    "holding": "holding tokens",
    "reserved": "reserved, no token yet",
    "internal": "internal fragmentation",
    "cached": "cached (prefix, evictable)",
    "external": "external fragmentation",
    "free": "free",
}

_METRICS = {
    "ttft": ("TTFT", "s"),
    "tpot": ("TPOT", "s"),
    "itl": ("inter-token latency", "s"),
    "e2e": ("end-to-end latency", "s"),
    "queue_delay": ("queue delay", "s"),
    "rate": ("arrival rate", "req/s"),
    "goodput": ("goodput", "req/s"),
    "goodput_rps": ("goodput", "req/s"),
    "goodput_share": ("share of requests within the SLO", "fraction"),
    "throughput_rps": ("throughput", "req/s"),
    "output_tps": ("output throughput", "tokens/s"),
    "service_gap": ("per-tenant service gap", "weighted tokens"),
    "normalized_latency": ("normalized latency", "s/token"),
    "request_throughput": ("request throughput", "req/s"),
    "throughput": ("throughput", "tokens/s"),
    "token_throughput": ("token throughput", "tokens/s"),
    "kv_utilization": ("KV utilization", "fraction"),
    "token_utilization": ("allocated KV slots holding tokens", "fraction"),
    "num_preemptions": ("preemptions", "count"),
}
_STAT = re.compile(r"^(?P<base>.+?)_(?P<stat>p\d+(?:\.\d+)?|mean|median|max|min|std)$")


def metric_parts(name: str) -> tuple[str, str | None]:
    """A column name as (readable name, unit or None): 'ttft_p99' -> ('TTFT p99', 's')."""
    stat = None
    if name not in _METRICS and (m := _STAT.match(name)):
        name, stat = m["base"], m["stat"]
    unit = None
    if name.endswith("_steps"):  # step-count variants of the latencies
        name, unit = name[: -len("_steps")], "steps"
    label, default_unit = _METRICS.get(name, (name.replace("_", " "), None))
    return (f"{label} {stat}" if stat else label), unit or default_unit


def metric_label(name: str) -> str:
    """An axis label with its unit: 'ttft_p99' -> 'TTFT p99 (s)'."""
    label, unit = metric_parts(name)
    return f"{label} ({unit})" if unit else label


def is_trace(data: Any) -> bool:
    """True for a Trace (anything offering `.steps` and `.requests` DataFrames)."""
    return hasattr(data, "steps") and hasattr(data, "requests")


def as_steps(data: Any, columns: Iterable[str] = ()) -> pd.DataFrame:
    """The steps table of a Trace or a steps DataFrame, checked for `columns`."""
    steps = data.steps if is_trace(data) else data
    return _checked(steps, columns, "steps", "a Trace or its .steps DataFrame")


def as_requests(data: Any, columns: Iterable[str] = ()) -> pd.DataFrame:
    """The requests table of a Trace or a requests DataFrame, checked for `columns`."""
    requests = data.requests if is_trace(data) else data
    return _checked(requests, columns, "requests", "a Trace or its .requests DataFrame")


def _checked(df: Any, columns: Iterable[str], what: str, wanted: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected {wanted}, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing and df.empty:
        raise ValueError(f"the {what} table is empty: did the Trace's hooks see the engine run?")
    if missing:
        raise ValueError(
            f"the {what} table lacks column(s) {missing}; it has {sorted(map(str, df.columns))}"
        )
    return df


def arrival_sorted(requests: pd.DataFrame) -> pd.DataFrame:
    """Requests in arrival order (ties keep the table's order, which is arrival order)."""
    if "arrival_time" not in requests.columns:
        return requests
    return requests.sort_values("arrival_time", kind="stable")


def request_order(data: Any) -> list:
    """Request ids in arrival order (a Trace or requests table), else by first appearance
    in the steps' `request_ids` / `preempted_ids`."""
    ids: list = []
    if is_trace(data) or (isinstance(data, pd.DataFrame) and "request_id" in data.columns):
        requests = as_requests(data)
        if not requests.empty:
            ids = list(arrival_sorted(requests)["request_id"])
    if is_trace(data) or (isinstance(data, pd.DataFrame) and "request_ids" in data.columns):
        steps = as_steps(data)
        for column in ("request_ids", "preempted_ids"):
            for cell in steps.get(column, ()):
                ids.extend(cell if isinstance(cell, list | tuple) else ())
    return list(dict.fromkeys(ids))


def request_colors(requests: Any, *, palette: Iterable | None = None) -> dict:
    """A stable request id -> RGB colour mapping: the palette cycled by arrival position.

    `requests` is a list of ids (their order is the position), or a Trace / DataFrame
    (arrival order). Every plot of one Trace colours a request the same way.
    """
    ids = list(dict.fromkeys(requests)) if _is_id_list(requests) else request_order(requests)
    colours = [mcolors.to_rgb(c) for c in (palette or REQUEST_PALETTE)]
    return {rid: colours[i % len(colours)] for i, rid in enumerate(ids)}


def _is_id_list(value: Any) -> bool:
    return not is_trace(value) and not isinstance(value, pd.DataFrame | Mapping)


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """`ax`, or a fresh figure's axes (constrained layout keeps outside legends in view)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt  # lazily: importing cortexlab must not pick a backend

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def phase_patch(label: str, style: Mapping) -> Patch:
    """A grey legend swatch with a phase's hatch and alpha."""
    return Patch(facecolor="0.5", edgecolor="0.25", label=label, **style)


def request_legend(ax: Axes, totals: pd.Series, colors: Mapping, max_entries: int) -> None:
    """Legend of the `max_entries` requests with the largest totals, plus '+N more'."""
    if len(totals) <= max_entries:  # everyone fits: keep arrival order
        top = totals.reindex([rid for rid in colors if rid in totals.index])
    else:
        top = totals.sort_values(ascending=False, kind="stable").head(max_entries)
    handles = [Patch(color=colors[rid], label=f"request {rid}") for rid in top.index]
    if len(totals) > len(top):
        handles.append(Patch(color="none", label=f"+{len(totals) - len(top)} more"))
    columns = max(1, math.ceil(len(handles) / 16))
    ax.legend(
        handles=handles,
        title="request",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        ncols=columns,
        fontsize="small",
    )
