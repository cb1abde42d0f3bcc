"""Top-p (nucleus): keep the fewest most-likely tokens whose probability reaches p."""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import NEG_INF, SamplingBatch, exp, mask, stages
from cortexlab.sampling.top_k import effective_top_k

import mlx.core as mx

# Cumulative sums in float32 land a few ulps off; without slack, p=0.8 over probabilities
# [0.5, 0.3, ...] would sometimes take a third token because 0.5 + 0.3 came out 0.79999995.
MASS_TOLERANCE = 1e-6


@stages.register("top_p")
class TopP:
    """Processor: nucleus over the row's current (temperature-scaled, top-k) distribution.

    Rows with top_k also set take their nucleus among their top-k tokens, as vLLM and
    Hugging Face do; the top token always survives.
    """

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with top_p < 1."""
        return not params.is_greedy and params.top_p < 1.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        active = [self.is_active(p) for p in batch.params]
        if not any(active):
            return logits
        vocab_size = logits.shape[-1]
        ks = [effective_top_k(p, vocab_size) for p in batch.params]
        # A full-vocabulary sort is the cost here (~75 ms at 16 x 49152 on CPU): when every
        # nucleus row also has top-k, only its top-(max k) candidates can be in the nucleus.
        num_candidates = max(k for k, a in zip(ks, active, strict=True) if a)
        candidates = logits if num_candidates >= vocab_size else mx.topk(logits, num_candidates)
        ordered = -mx.sort(-candidates, axis=-1)  # descending
        rank = mx.arange(ordered.shape[-1])[None, :]
        ordered = mask(ordered, rank >= mx.array(ks)[:, None])

        weights = exp(ordered - ordered[:, :1])  # unnormalised probabilities, top = 1
        mass_before = mx.cumsum(weights, axis=-1, inclusive=False)
        total = weights.sum(axis=-1, keepdims=True)
        top_p = batch.column(lambda p: p.top_p - MASS_TOLERANCE)
        # Token j joins while the mass of the tokens above it is still short of p.
        num_kept = (mass_before < top_p * total).sum(axis=-1, keepdims=True)
        num_kept = mx.maximum(num_kept, 1)  # p below the tolerance still keeps the top token
        threshold = mx.take_along_axis(ordered, num_kept - 1, axis=-1)
        threshold = mx.where(mx.array(active)[:, None], threshold, NEG_INF)
        return mask(logits, logits < threshold)
