"""Typical-p (locally typical sampling): keep the tokens whose surprise is closest to the
entropy, fewest first, until their mass reaches typical_p (the crossing token stays).

Source: Meier, Pimentel, Wiher & Cotterell, "Locally Typical Sampling" (TACL 2023);
Hugging Face ``TypicalLogitsWarper`` (the definition followed here).
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, exp, register
from cortexlab.sampling.facts import (
    candidates,
    claim,
    count_kept,
    derive,
    entropy,
    is_fast,
    log_normaliser,
)

import mlx.core as mx


@register("typical_p")
class TypicalP:
    """Processor: mask tokens with ``|-log p - H|`` above the crossing token's."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with typical_p < 1."""
        return not params.is_greedy and params.typical_p < 1.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        active = [self.is_active(p) for p in batch.params]
        if not any(active):
            return logits
        lse, h = log_normaliser(batch, logits), entropy(batch, logits)
        # Typical tokens are found among the top-C by probability: everything outside has
        # a larger surprise than the C-th candidate, which the check below relies on.
        _, values = candidates(batch, logits)
        shifted = mx.abs(lse - values - h)  # |-log p - H| for each candidate
        order = mx.argsort(shifted, axis=-1)
        sorted_shift = mx.take_along_axis(shifted, order, axis=-1)
        cumulative = mx.cumsum(exp(mx.take_along_axis(values, order, axis=-1) - lse), axis=-1)
        mass = batch.column(lambda p: p.typical_p)
        last = (cumulative < mass).sum(axis=-1, keepdims=True)
        limit = mx.take_along_axis(sorted_shift, mx.minimum(last, values.shape[-1] - 1), -1)
        is_active = mx.array(active)[:, None]
        limit = mx.maximum(limit, (0.5 - is_active) * mx.inf)  # inactive rows: +inf
        full_shift = mx.abs(lse - logits - h)
        drop = full_shift > limit
        out = mx.minimum(logits, (0.5 - drop) * mx.inf)
        if is_fast(batch, logits):
            inside = (last < values.shape[-1]).reshape(-1)
            kept_outside = count_kept(-full_shift, -limit) != count_kept(-shifted, -limit)
            claim(batch, (inside & ~kept_outside) | ~is_active.reshape(-1))
        return derive(batch, logits, out, keeps_top=False, covers=all(active))
