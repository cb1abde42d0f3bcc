"""XTC (exclude top choices): with probability xtc_probability per row and step, remove
every token with probability >= xtc_threshold except the least likely of them.

Source: p-e-w, text-generation-webui PR #6335 (2024); llama.cpp ``xtc``, mlx-lm
``apply_xtc``. The coin is seeded per (request seed, step), like the draw itself; EOS
tokens are never removed (mlx-lm's ``xtc_special_tokens``). Tokens tied with the least
likely one above the threshold all stay.
"""

from __future__ import annotations

import math

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, mask, register
from cortexlab.sampling.categorical import row_uniform
from cortexlab.sampling.facts import derive, log_normaliser

import mlx.core as mx

XTC_STREAM = 1  # the coin's random stream, independent of the token draw's


def coin(params: SamplingParams, seed: int, step: int) -> bool:
    """Whether XTC acts on this row at this step."""
    if params.is_greedy or params.xtc_probability <= 0:
        return False
    return row_uniform(seed, step, XTC_STREAM) < params.xtc_probability


@register("xtc")
class XTC:
    """Processor: for rows whose coin came up, mask the top choices but the weakest of them."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with xtc_probability > 0 (the coin decides per step)."""
        return not params.is_greedy and params.xtc_probability > 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        rows = zip(batch.params, batch.seeds, batch.steps, strict=True)
        on = [coin(p, s, t) for p, s, t in rows]
        if not any(on):
            return logits
        log_threshold = batch.column(lambda p: math.log(max(p.xtc_threshold, 1e-45)))
        # p >= threshold  <=>  logit >= logsumexp + log(threshold); -inf never qualifies.
        above = (logits >= log_normaliser(batch, logits) + log_threshold) & (logits > -mx.inf)
        weakest = -mask(-logits, ~above).max(axis=-1, keepdims=True)
        drop = above & (logits > weakest) & mx.array(on)[:, None]
        if batch.eos_token_ids:
            is_eos = mx.zeros((logits.shape[-1],), dtype=mx.bool_)
            is_eos[mx.array([t for t in batch.eos_token_ids if t < logits.shape[-1]])] = True
            drop = drop & ~is_eos
        return derive(batch, logits, mask(logits, drop), keeps_top=False)
