"""Per-request timelines: phase spans derived from the steps, drawn as a Gantt chart."""

from __future__ import annotations

import math
from typing import Any

from cortexlab.viz._common import (
    as_steps,
    is_trace,
    new_axes,
    phase_patch,
    request_colors,
    request_order,
)

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

PHASES = ("queued", "prefill", "decode", "preempted")
PHASE_STYLES = {
    "queued": {"alpha": 0.25},
    "prefill": {"alpha": 1.0, "hatch": "////"},
    "decode": {"alpha": 0.75},
    "preempted": {"alpha": 0.3, "hatch": "xx"},
}
_WAITING = ("queued", "preempted")


def _request_steps(data: Any, steps: pd.DataFrame) -> tuple[dict, dict, dict]:
    """(arrival step, finish step) per request and the preempted ids per step: from the
    request events of a Trace, else from the requests table's times mapped onto the steps'
    start times (preemptions then come from the steps' `preempted_ids` alone)."""
    events = getattr(data, "request_events", None) if is_trace(data) else None
    if events is not None and not events.empty:
        first = events.drop_duplicates(["event", "request_id"])
        at = {
            e: dict(zip(g["request_id"], g["step"], strict=True)) for e, g in first.groupby("event")
        }
        # A step whose batch came out empty has no step.batch row, but its preemptions count.
        preempted = events[events["event"] == "request.preempted"]
        by_step = preempted.groupby("step")["request_id"].agg(list).to_dict()
        return at.get("request.arrived", {}), at.get("request.finished", {}), by_step
    if not (isinstance(data, pd.DataFrame) and "arrival_time" in data.columns):
        return {}, {}, {}
    starts = steps["start"].to_numpy(float)
    numbers = steps["step"].to_numpy()
    last = len(numbers) - 1

    def step_at(times: pd.Series) -> np.ndarray:
        return numbers[np.minimum(np.searchsorted(starts, times.to_numpy(float)), last)]

    done = data.dropna(subset=["finish_time"]) if "finish_time" in data else data.iloc[:0]
    return (
        dict(zip(data["request_id"], step_at(data["arrival_time"]), strict=True)),
        dict(zip(done["request_id"], step_at(done["finish_time"]), strict=True)),
        {},
    )


def request_spans(data: Any, requests: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each request's phases as spans of steps: request_id, phase, start_step, end_step
    (exclusive). Phases: queued (arrival to first run), prefill, decode, preempted (waiting
    again after a preemption). `data` is a Trace or its steps table; with a steps table,
    pass `requests` to get the queued spans."""
    steps = as_steps(data, ["step", "request_ids", "is_prefill", "preempted_ids"])
    steps = steps.sort_values("step", kind="stable")
    arrived, finished, preempted_at = _request_steps(data if requests is None else requests, steps)
    by_step_arrival, by_step_finish = {}, {}
    for rid, k in arrived.items():
        by_step_arrival.setdefault(k, []).append(rid)
    for rid, k in finished.items():
        by_step_finish.setdefault(k + 1, []).append(rid)  # stops waiting after its last step
    spans, open_spans, waiting = [], {}, {}
    for k, ids, prefill, preempted in steps[
        ["step", "request_ids", "is_prefill", "preempted_ids"]
    ].itertuples(index=False):
        ran = dict(zip(*_lists(ids, prefill), strict=True))
        for rid in by_step_finish.get(k, ()):
            waiting.pop(rid, None)
        waiting.update(dict.fromkeys(by_step_arrival.get(k, ()), "queued"))
        preempted = _lists(preempted)[0] + preempted_at.get(k, [])
        waiting.update(dict.fromkeys(preempted, "preempted"))
        for rid in ran:
            waiting.pop(rid, None)
        phases = {rid: ("prefill" if p else "decode") for rid, p in ran.items()} | waiting
        for rid, phase in phases.items():
            span = open_spans.get(rid)
            if span is not None and span[1] == phase and span[3] == k:
                span[3] = k + 1
            else:
                open_spans[rid] = span = [rid, phase, k, k + 1]
                spans.append(span)
    # A request run in its arrival step still queued (for less than a step): keep a
    # zero-step queued span so the time axis can show it.
    queued = {s[0] for s in spans if s[1] == "queued"}
    spans += [[rid, "queued", k, k] for rid, k in arrived.items() if rid not in queued]
    return pd.DataFrame(spans, columns=["request_id", "phase", "start_step", "end_step"])


def _lists(*cells: Any) -> list[list]:
    """Per-step list cells as lists (an empty step's cells are NaN)."""
    return [list(c) if isinstance(c, list | tuple) else [] for c in cells]


def _span_times(spans: pd.DataFrame, steps: pd.DataFrame, arrivals: dict) -> pd.DataFrame:
    """Spans in engine-clock seconds: a running phase covers its steps' start..end; a
    waiting phase lasts until the next step starts; queued begins at the arrival time."""
    start = dict(zip(steps["step"], steps["start"], strict=True))
    end = dict(zip(steps["step"], steps["end"], strict=True))

    def edges(rid: Any, phase: str, a: int, b: int) -> tuple[float, float]:
        if phase not in _WAITING:
            return start[a], end[b - 1]
        after = start[b] if b in start else end[b - 1]
        return (arrivals.get(rid, start[a]) if phase == "queued" else start[a]), after

    times = [edges(*row) for row in spans.itertuples(index=False)]
    return spans.assign(start=[t[0] for t in times], end=[t[1] for t in times])


def plot_gantt(
    trace: Any, *, ax: Axes | None = None, x: str = "time", requests: pd.DataFrame | None = None
) -> Axes:
    """One row per request (arrival order): queued, prefill, decode and preempted spans."""
    if x not in ("time", "step"):
        raise ValueError(f"x must be 'time' or 'step', got {x!r}")
    steps = as_steps(trace, ["step", "start", "end"] if x == "time" else ["step"])
    source = trace if requests is None else requests
    spans = request_spans(trace, requests)
    if x == "time":
        table = source.requests if is_trace(source) else source
        has_arrivals = isinstance(table, pd.DataFrame) and "arrival_time" in table.columns
        arrivals = (
            dict(zip(table["request_id"], table["arrival_time"], strict=True))
            if has_arrivals
            else {}
        )
        spans = _span_times(spans, steps, arrivals)
    else:  # a step k occupies [k - 0.5, k + 0.5), centred like the bar plots' steps
        spans = spans.assign(start=spans["start_step"] - 0.5, end=spans["end_step"] - 0.5)
    order = request_order(source)
    order += [rid for rid in dict.fromkeys(spans["request_id"]) if rid not in order]
    colors = request_colors(order)
    row = {rid: i for i, rid in enumerate(order)}
    ax = new_axes(ax, (9, max(2.5, 0.22 * len(order) + 1.2)))
    for (rid, phase), group in spans[spans["end"] > spans["start"]].groupby(
        ["request_id", "phase"], sort=False
    ):
        ax.broken_barh(
            list(zip(group["start"], group["end"] - group["start"], strict=True)),
            (row[rid] - 0.4, 0.8),
            facecolor=colors[rid],
            edgecolor=[0.55 * c for c in colors[rid]],  # hatches take the edge colour
            linewidth=0.5,
            gid=f"{phase}:{rid}",
            label=f"_{phase} {rid}",
            **PHASE_STYLES[phase],
        )
    every = max(1, math.ceil(len(order) / 40))  # at most ~40 labels stay legible
    ax.set_yticks(range(0, len(order), every), [str(r) for r in order[::every]])
    ax.set_ylim(len(order) - 0.5, -0.5)  # first arrival on top
    ax.set(
        xlabel="time (s, engine clock)" if x == "time" else "step",
        ylabel="request (arrival order)",
        title=f"Request timeline ({len(order)} requests)",
    )
    handles = [phase_patch(p, PHASE_STYLES[p]) for p in PHASES]
    ax.legend(handles=handles, title="phase", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
