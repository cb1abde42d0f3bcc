"""Top-p (nucleus): keep the fewest most-likely tokens whose probability reaches p.

Source: Holtzman et al., "The Curious Case of Neural Text Degeneration" (2020). The token
that crosses p is kept, and so is the top token whatever p is.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, exp, mask, register, row_sum
from cortexlab.sampling.facts import (
    candidates,
    claim,
    derive,
    is_fast,
    require_finite,
    row_max,
    weights,
)

import mlx.core as mx

# Cumulative sums in float32 land a few ulps off; without slack, p=0.8 over probabilities
# [0.5, 0.3, ...] would sometimes take a third token because 0.5 + 0.3 came out 0.79999995.
MASS_TOLERANCE = 1e-6


@register("top_p")
class TopP:
    """Processor: nucleus over the row's current distribution (after the stages before it).

    The nucleus is found among the top-C candidates (no full-vocabulary sort); a row whose
    candidates hold less than p of the mass is redone with more candidates, then exactly.
    """

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with top_p < 1."""
        return not params.is_greedy and params.top_p < 1.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        active = [self.is_active(p) for p in batch.params]
        if not any(active):
            return logits
        ids, ordered = candidates(batch, logits)  # descending; all V when exact
        # The total is summed over the whole vocabulary in vocabulary order, so that the
        # candidate and exact paths compare the same numbers.
        total = row_sum(weights(batch, logits))
        require_finite(batch, total)
        mass_before = mx.cumsum(exp(ordered - row_max(batch, logits)), axis=-1, inclusive=False)
        top_p = batch.column(lambda p: p.top_p - MASS_TOLERANCE)
        # Token j joins while the mass of the tokens above it is still short of p.
        num_kept = (mass_before < top_p * total).sum(axis=-1, keepdims=True)
        num_kept = mx.maximum(num_kept, 1)  # p below the tolerance still keeps the top token
        threshold = mx.take_along_axis(ordered, num_kept - 1, axis=-1)
        is_active = mx.array(active)[:, None]
        threshold = mask(threshold, ~is_active)
        out = mask(logits, logits < threshold)
        if is_fast(batch, logits):
            # Exact if the nucleus ended inside the candidates, strictly above the last one
            # (so no token outside them ties with the threshold).
            inside = (num_kept < ordered.shape[-1]) & (threshold > ordered[:, -1:])
            claim(batch, (inside | ~is_active).reshape(-1))
        return derive(batch, logits, out, threshold=threshold, covers=all(active))
