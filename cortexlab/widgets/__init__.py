"""ipywidgets over the plain plotting functions (each picture is testable without a browser).

``SamplerExplorer(model, prompt)``: a slider per sampling parameter and an order preset;
redraws the next-token candidates and a short continuation. Loaded on first use
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

__all__ = [
    "CONTROLS",
    "ExplorerState",
    "SamplerExplorer",
    "continuation",
    "explorer_params",
    "params_line",
    "prompt_state",
    "render",
]
