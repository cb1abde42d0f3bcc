"""Plots of a Trace: plain matplotlib functions `plot_x(data, *, ax=None, ...) -> Axes`.

Each takes a `cl.Trace` or the DataFrame it reads, draws into `ax` (or a new figure) and
returns the Axes. A request keeps one colour in every plot of the same Trace
(`request_colors`). Sampling: `plot_token_distribution` (one logits row through the chain),
`plot_entropy` (a `Trace(tokens=True)`), `token_html` (text coloured by token probability).
KV arena: `plot_cache_occupancy` (slots by kind over time), `plot_block_map` (which request
holds which block; a `Trace(blocks=True)`), `plot_fragmentation` (waste per allocator).
"""

from __future__ import annotations

from cortexlab.viz._common import (
    KV_COLORS,
    REQUEST_PALETTE,
    metric_label,
    request_colors,
    request_order,
)
from cortexlab.viz.kv import kv_waste_table, plot_block_map, plot_fragmentation
from cortexlab.viz.latency import plot_goodput_vs_load, plot_latency_cdf, plot_metric_bars
from cortexlab.viz.sampling import (
    TokenHTML,
    plot_entropy,
    plot_token_distribution,
    token_html,
    token_label,
)
from cortexlab.viz.steps import (
    batch_tokens,
    plot_batch_composition,
    plot_cache_occupancy,
    plot_queue,
)
from cortexlab.viz.timeline import PHASES, plot_gantt, request_spans

__all__ = [
    "KV_COLORS",
    "PHASES",
    "REQUEST_PALETTE",
    "TokenHTML",
    "batch_tokens",
    "kv_waste_table",
    "metric_label",
    "plot_batch_composition",
    "plot_block_map",
    "plot_cache_occupancy",
    "plot_entropy",
    "plot_fragmentation",
    "plot_gantt",
    "plot_goodput_vs_load",
    "plot_latency_cdf",
    "plot_metric_bars",
    "plot_queue",
    "plot_token_distribution",
    "request_colors",
    "request_order",
    "request_spans",
    "token_html",
    "token_label",
]
