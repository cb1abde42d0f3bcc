"""ipywidgets over the plain plotting functions (each picture is testable without a browser).

``SamplerExplorer(model, prompt)``: a slider per sampling parameter and an order preset;
redraws the next-token candidates and a short continuation. ``TraceExplorer(trace)``: a step
slider over a recorded Trace showing the KV block map, the batch, the waiting queue and the
KV accounting after that step. Loaded on first use
(``cl.widgets``), so ``import cortexlab`` does not import ipywidgets.
"""

from __future__ import annotations

from cortexlab.widgets.explorer import (
    CONTROLS,
    ExplorerState,
    SamplerExplorer,
    continuation,
    explorer_params,
    params_line,
    prompt_state,
    render,
)
from cortexlab.widgets.trace_explorer import (
    CELL,
    QUEUE_COLUMNS,
    BlockCodes,
    TraceExplorer,
    block_codes,
    block_image,
    kv_line,
    queue_table,
)

__all__ = [
    "CELL",
    "CONTROLS",
    "QUEUE_COLUMNS",
    "BlockCodes",
    "ExplorerState",
    "SamplerExplorer",
    "TraceExplorer",
    "block_codes",
    "block_image",
    "continuation",
    "explorer_params",
    "kv_line",
    "params_line",
    "prompt_state",
    "queue_table",
    "render",
]
