"""Pictures of the KV arena: which request holds which block, and each allocator's waste."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cortexlab.metrics import kv_waste
from cortexlab.viz._common import (
    KV_COLORS,
    KV_LABELS,
    as_steps,
    is_trace,
    new_axes,
    request_colors,
    request_order,
)

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

_BLOCK_COLUMNS = ["step", "block_id", "request_id", "num_tokens", "ref_count", "state"]
_SHARED, _SHARED_LIGHT = "0.3", "0.65"
_PAD = 0.06  # gap around each cell, in cell widths, so neighbouring blocks stay apart


def _tint(color: Any, amount: float = 0.6) -> tuple:
    """`color` mixed with white: the reserved (token-less) part of a request's block."""
    return tuple(c + (1.0 - c) * amount for c in mcolors.to_rgb(color))


def _grid_columns(num_blocks: int) -> int:
    """At least 32 per row, else a power of two near sqrt(2n): about twice as wide as tall."""
    return min(num_blocks, max(32, 2 ** math.ceil(math.log2(math.sqrt(2 * num_blocks)))))


def _cells(block_ids: Any, columns: int, fill: Any = 1.0) -> np.ndarray:
    """Rectangles [n, 4, 2] of blocks in the grid (block 0 top left), `fill` of their width."""
    ids = np.asarray(block_ids, np.int64)
    x0, y0 = ids % columns + _PAD, ids // columns + _PAD
    x1 = x0 + (1 - 2 * _PAD) * np.broadcast_to(np.asarray(fill, float), ids.shape)
    y1 = y0 + 1 - 2 * _PAD
    return np.stack([np.c_[x0, y0], np.c_[x0, y1], np.c_[x1, y1], np.c_[x1, y0]], axis=1)


def _add_cells(ax: Axes, ids: Any, columns: int, gid: str, fill: Any = 1.0, **style: Any) -> None:
    if len(ids):
        style.setdefault("linewidth", 0)
        ax.add_collection(PolyCollection(_cells(ids, columns, fill), gid=gid, **style))


def _block_rows(data: Any, step: int | None) -> tuple[pd.DataFrame, dict, list]:
    """One step's `.blocks` rows, the table's attrs, and request ids in colour order."""
    if is_trace(data):
        rows = data.blocks_at(step)  # raises, saying how to enable, without blocks=True
        order = list(dict.fromkeys([*request_order(data), *data.block_owner_ids]))
        return rows, dict(rows.attrs), order
    if not isinstance(data, pd.DataFrame):
        raise TypeError(
            f"expected a Trace(blocks=True) or its .blocks DataFrame, got {type(data).__name__}"
        )
    missing = [c for c in _BLOCK_COLUMNS if c not in data.columns]
    if missing:
        raise ValueError(f"the blocks table lacks column(s) {missing}; is it a Trace's .blocks?")
    attrs = dict(data.attrs)
    if step is None:
        if "last_step" not in attrs and data.empty:
            raise ValueError("the blocks table is empty: did the Trace record kv.blocks events?")
        step = int(attrs.get("last_step", data["step"].max()))
    # The whole table's first-appearance order: a request keeps its colour step to step.
    order = list(dict.fromkeys(data["request_id"].dropna()))
    return data[data["step"] == step], attrs | {"last_step": step}, order


def plot_block_map(
    trace: Any,
    step: int | None = None,
    *,
    ax: Axes | None = None,
    num_blocks: int | None = None,
    block_size: int | None = None,
    columns: int | None = None,
    colors: Mapping | None = None,
    annotate: bool | None = None,
    max_legend: int = 12,
) -> Axes:
    """The KV arena after `step` (default the last) as a grid of blocks coloured by owner."""
    rows, attrs, order = _block_rows(trace, step)
    step = int(attrs["last_step"]) if rows.empty else int(rows["step"].iloc[0])
    held = rows[rows["state"] != "cached"]
    num_blocks = num_blocks or attrs.get("num_blocks") or int(rows["block_id"].max()) + 1
    if not block_size and not attrs.get("block_size"):
        fullest = held["num_tokens"].max()  # some block is usually full
        block_size = int(fullest) if pd.notna(fullest) and fullest > 0 else 1
    block_size = block_size or attrs["block_size"]
    columns = columns or _grid_columns(num_blocks)
    grid_rows = math.ceil(num_blocks / columns)
    colors = dict(colors) if colors is not None else request_colors(order)
    ax = new_axes(ax, (9, min(8.0, 1.2 + 9 * grid_rows / columns)))

    # Per block, the fill: the most tokens any holder has in it (holders of a shared block
    # agree on its tokens except while a fork's copy-on-write is pending).
    fill = held.groupby("block_id")["num_tokens"].max().astype(float) / block_size
    shared = held[held["state"] == "shared"].groupby("block_id")["ref_count"].max()
    cached = rows.loc[rows["state"] == "cached", "block_id"].unique()
    free = np.setdiff1d(np.arange(num_blocks), np.concatenate([fill.index, cached]))
    _add_cells(ax, free, columns, "free", facecolor=KV_COLORS["free"])
    _add_cells(
        ax, cached, columns, "cached", facecolor=KV_COLORS["cached"], edgecolor="0.45", hatch="///"
    )
    own = held[held["state"] == "held"]
    for rid, group in own.groupby("request_id", sort=False):
        ids = group["block_id"].to_numpy()
        color = colors.get(rid, "0.5")
        _add_cells(ax, ids, columns, f"reserved:{rid}", facecolor=_tint(color))
        tokens = fill.loc[ids].to_numpy()
        has = tokens > 0
        _add_cells(ax, ids[has], columns, f"tokens:{rid}", tokens[has], facecolor=color)
    ids = shared.index.to_numpy()
    # Two hatched layers in opposite shades keep "shared" visible whether a block is full.
    _add_cells(ax, ids, columns, "shared", facecolor=_SHARED_LIGHT, edgecolor=_SHARED, hatch="xx")
    tokens = fill.loc[ids].to_numpy()
    _add_cells(
        ax,
        ids[tokens > 0],
        columns,
        "tokens:shared",
        tokens[tokens > 0],
        facecolor=_SHARED,
        edgecolor=_SHARED_LIGHT,
        hatch="xx",
    )
    if annotate if annotate is not None else columns <= 32:
        for block, refs in shared.items():
            ax.text(
                block % columns + 0.5,
                block // columns + 0.5,
                str(refs),
                ha="center",
                va="center",
                color="white",
                fontsize="x-small",
                fontweight="bold",
                gid=f"refs:{block}",
            )

    ax.set(xlim=(0, columns), ylim=(grid_rows, 0), aspect="equal")
    ax.set_xticks(np.arange(0, columns, max(1, columns // 8)) + 0.5)
    ax.set_xticklabels([f"+{c}" for c in range(0, columns, max(1, columns // 8))])
    every = max(1, math.ceil(grid_rows / 16))
    ax.set_yticks(np.arange(0, grid_rows, every) + 0.5)
    ax.set_yticklabels([str(r * columns) for r in range(0, grid_rows, every)])
    ax.tick_params(length=0, labelsize="small")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set(xlabel="block id (row start + offset)", ylabel="first block of row")
    allocator = attrs.get("allocator")
    ax.set_title(
        f"KV blocks after step {step}"
        + (f" ({allocator})" if allocator else "")
        + f"\n{len(fill) - len(shared)} held, {len(shared)} shared, {len(cached)} cached, "
        f"{len(free)} free of {num_blocks} blocks x {block_size} slots",
        fontsize="medium",
    )
    _block_legend(ax, own, colors, max_legend)
    return ax


def _block_legend(ax: Axes, own: pd.DataFrame, colors: Mapping, max_entries: int) -> None:
    """What the cell styles mean, then the requests holding the most blocks."""
    handles = [
        Patch(facecolor=KV_COLORS["free"], label="free"),
        Patch(facecolor=KV_COLORS["cached"], edgecolor="0.45", hatch="///", label="cached"),
        Patch(facecolor=_SHARED, edgecolor=_SHARED_LIGHT, hatch="xx", label="shared (holders)"),
        Patch(facecolor=_tint("0.3"), label="light: reserved, no token"),
    ]
    counts = own.groupby("request_id", sort=False).size()
    if len(counts) <= max_entries:  # everyone fits: keep colour (arrival) order
        top = [rid for rid in colors if rid in counts.index]
    else:
        top = list(counts.sort_values(ascending=False, kind="stable").head(max_entries).index)
    handles += [Patch(color=colors.get(rid, "0.5"), label=f"request {rid}") for rid in top]
    if len(counts) > len(top):
        handles.append(Patch(color="none", label=f"+{len(counts) - len(top)} more"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        ncols=max(1, math.ceil(len(handles) / 16)),
        fontsize="small",
    )


# kv_waste keys of the bars, in drawing order, and the KV part each one shows.
_WASTE_BARS = {
    "utilization": "holding",
    "reserved_share": "reserved",
    "internal_share": "internal",
    "external_share": "external",
    "cached_share": "cached",
}


def kv_waste_table(data: Any) -> pd.DataFrame:
    """`kv_waste` per run, one row each: from a Comparison, a dict of name -> Trace / Run /
    steps DataFrame, one Trace or steps DataFrame, or such a table already."""
    if isinstance(data, pd.DataFrame) and "internal_share" in data.columns:
        return data
    runs = getattr(data, "runs", None)  # a cortexlab.experiment.Comparison
    if runs is not None:
        data = runs
    if is_trace(data) or isinstance(data, pd.DataFrame):
        data = {"run": data}
    if not isinstance(data, Mapping):
        raise TypeError(
            f"expected a Comparison, a dict of name -> Trace, or a kv_waste table, "
            f"got {type(data).__name__}"
        )
    table = {
        name: kv_waste(as_steps(getattr(run, "trace", run), ["kv_used_slots"]))
        for name, run in data.items()
    }
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("run")


def plot_fragmentation(data: Any, *, ax: Axes | None = None) -> Axes:
    """Bars per allocator (run): mean share of KV slots holding tokens, reserved, internal and
    external fragmentation and cached over steps with a running sequence; peaks as ticks."""
    table = kv_waste_table(data)
    ax = new_axes(ax, (max(5.0, 1.6 * len(table) + 2), 3.4))
    width = 0.8 / len(_WASTE_BARS)
    x = np.arange(len(table))
    for i, (key, part) in enumerate(_WASTE_BARS.items()):
        offset = x - 0.4 + (i + 0.5) * width
        ax.bar(
            offset,
            table[key],
            width,
            color=KV_COLORS[part],
            label=KV_LABELS[part],
            gid=part,
        )
        peak = f"peak_{key}"
        if peak in table:
            ax.plot(offset, table[peak], "_", color="k", markersize=9, markeredgewidth=1.5)
    labels = [
        f"{name}\n{u:.0%} of held slots\nhold tokens" if np.isfinite(u) else str(name)
        for name, u in zip(table.index, table["token_utilization"], strict=True)
    ]
    ax.set_xticks(x, labels, fontsize="small")
    shown = [c for k in _WASTE_BARS for c in (k, f"peak_{k}") if c in table]
    top = np.nanmax(table[shown].to_numpy(float), initial=0.0)
    ax.set_ylim(0, min(1.0, max(0.05, float(top) * 1.1)))
    ax.set(ylabel="share of KV slots", title="KV slots per allocator (mean over busy steps)")
    handles, names = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="k", marker="_", linestyle="none", markersize=9))
    names.append("peak")
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax
