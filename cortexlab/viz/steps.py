"""Per-step pictures: what each batch held, how the KV arena was used, how long the queues were."""

from __future__ import annotations

from typing import Any

from cortexlab.metrics import KV_PARTS, kv_breakdown
from cortexlab.viz._common import (
    KV_COLORS,
    KV_LABELS,
    as_steps,
    new_axes,
    request_colors,
    request_legend,
)

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.ticker import MaxNLocator

# What every trace has; kv_internal_slots (or the older kv_fragmented_slots), kv_cached_slots
# and kv_external_slots are read when present (`cortexlab.metrics.kv_breakdown`).
_KV_COLUMNS = ["kv_used_slots", "kv_reserved_slots", "kv_free_slots"]


def batch_tokens(data: Any) -> pd.DataFrame:
    """One row per (step, scheduled request): step, request_id, num_new_tokens, is_prefill,
    and `bottom`, the tokens stacked below it in that step's batch order."""
    steps = as_steps(data, ["step", "request_ids", "num_new_tokens", "is_prefill"])
    rows = steps.dropna(subset=["request_ids"])[
        ["step", "request_ids", "num_new_tokens", "is_prefill"]
    ]
    rows = rows.explode(["request_ids", "num_new_tokens", "is_prefill"]).dropna()
    rows = rows.rename(columns={"request_ids": "request_id"}).astype(
        {"num_new_tokens": int, "is_prefill": bool}
    )
    cumulative = rows.groupby("step", sort=False)["num_new_tokens"].cumsum()
    return rows.assign(bottom=cumulative - rows["num_new_tokens"]).reset_index(drop=True)


def _bars(ax: Axes, x: Any, height: Any, bottom: Any, **kwargs: Any) -> PolyCollection:
    """Bars (width 0.8, centred on `x`) as one PolyCollection: one artist however many."""
    x, height, bottom = (np.asarray(v, float) for v in (x, height, bottom))
    left, right, top = x - 0.4, x + 0.4, bottom + height
    corners = [(left, bottom), (left, top), (right, top), (right, bottom)]
    kwargs.setdefault("linewidth", 0)
    collection = PolyCollection(np.stack([np.c_[a, b] for a, b in corners], axis=1), **kwargs)
    ax.add_collection(collection)
    return collection


def plot_batch_composition(
    trace: Any, *, ax: Axes | None = None, by: str = "phase", max_legend: int = 12
) -> Axes:
    """Stacked bars of the tokens in each step's batch: prefill vs decode (`by="phase"`), or
    one segment per request in its colour, prefill hatched (`by="request"`)."""
    if by not in ("phase", "request"):
        raise ValueError(f"by must be 'phase' or 'request', got {by!r}")
    ax = new_axes(ax, (9, 3.2))
    if by == "phase":
        steps = as_steps(trace, ["step", "num_prefill_tokens", "num_batched_tokens"])
        prefill = steps["num_prefill_tokens"].fillna(0)
        decode = steps["num_batched_tokens"].fillna(0) - prefill
        for phase, height, bottom, color in [
            ("prefill", prefill, 0 * prefill, "C1"),
            ("decode", decode, prefill, "C0"),
        ]:
            _bars(
                ax, steps["step"], height, bottom, color=color, label=f"{phase} tokens", gid=phase
            )
        ax.legend(loc="upper right")
    else:
        rows = batch_tokens(trace)
        colors = request_colors(trace)
        for (rid, is_prefill), group in rows.groupby(["request_id", "is_prefill"], sort=False):
            phase = "prefill" if is_prefill else "decode"
            _bars(
                ax,
                group["step"],
                group["num_new_tokens"],
                group["bottom"],
                facecolor=colors[rid],
                edgecolor=[0.5 * c for c in colors[rid]],  # hatches take the edge colour
                hatch="////" if is_prefill else None,
                gid=f"request:{rid}:{phase}",
            )
        totals = rows.groupby("request_id", sort=False)["num_new_tokens"].sum()
        request_legend(ax, totals, colors, max_legend)
    ax.autoscale_view()
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="step", ylabel="tokens in batch", title=f"Batch composition (by {by})")
    return ax


def _x(steps: pd.DataFrame, x: str) -> tuple[pd.Series, str]:
    if x == "step":
        return steps["step"], "step"
    if x == "time":
        return as_steps(steps, ["end"])["end"], "time (s, engine clock; end of step)"
    raise ValueError(f"x must be 'step' or 'time', got {x!r}")


def plot_cache_occupancy(
    trace: Any, *, ax: Axes | None = None, x: str = "step", utilization: bool = True
) -> Axes:
    """Stacked area of the KV arena's slots after each step (holding tokens, reserved,
    internal fragmentation, cached, external fragmentation, free); utilization on a twin axis."""
    steps = as_steps(trace, ["step", *_KV_COLUMNS])
    parts = kv_breakdown(steps)
    steps = steps.loc[parts.index]
    xs, xlabel = _x(steps, x)
    # Older traces lack the cached and external columns: leave those layers out, not at 0.
    shown = [
        p for p in KV_PARTS if p not in ("cached", "external") or f"kv_{p}_slots" in steps.columns
    ]
    ax = new_axes(ax, (9, 3.2))
    layers = ax.stackplot(
        xs,
        *(parts[p] for p in shown),
        labels=[KV_LABELS[p] for p in shown],
        colors=[KV_COLORS[p] for p in shown],
    )
    for part, layer in zip(shown, layers, strict=True):
        layer.set_gid(part)
    total = int(parts["num_slots"].max()) if len(parts) else 0
    ax.set(xlabel=xlabel, ylabel="KV slots (tokens)", ylim=(0, max(total, 1)))
    if x == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    peak = parts["holding"].max() / total if total else 0.0
    ax.set_title(f"KV cache occupancy ({total} slots; peak utilization {peak:.0%})")
    if utilization:
        twin = ax.twinx()
        share = steps["kv_utilization"] if "kv_utilization" in steps else parts["holding"] / total
        twin.plot(xs, share, color="k", linestyle="--", linewidth=1, label="utilization")
        twin.set(ylabel="utilization (holding / all slots)", ylim=(0, 1))
        handles += twin.get_legend_handles_labels()[0]
        labels += ["utilization"]
    # Outside the plot, past the twin axis's labels when there is one.
    anchor = (1.12 if utilization else 1.01, 1.0)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=anchor, fontsize="small")
    return ax


def plot_queue(trace: Any, *, ax: Axes | None = None, x: str = "step") -> Axes:
    """Waiting and running request counts after each step; preemptions marked below."""
    steps = as_steps(trace, ["step", "num_waiting", "num_running"])
    xs, xlabel = _x(steps, x)
    ax = new_axes(ax, (9, 3.0))
    ax.plot(xs, steps["num_waiting"], drawstyle="steps-post", color="C3", label="waiting")
    ax.plot(xs, steps["num_running"], drawstyle="steps-post", color="C0", label="running")
    if "num_preempted" in steps:
        hit = steps["num_preempted"].fillna(0) > 0
        ax.plot(xs[hit], [0] * int(hit.sum()), "v", color="k", ms=6, label="preemption")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=xlabel, ylabel="requests", title="Queue lengths")
    ax.set_ylim(bottom=-0.5)
    ax.legend(loc="upper right")
    return ax
