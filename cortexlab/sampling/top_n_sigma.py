"""Top-n-sigma: keep tokens whose logit is within n standard deviations of the max.

Source: Tang et al., "Top-nσ: Not All Logits Are You Need" (2024); llama.cpp
``top_n_sigma`` (mean and standard deviation over the finite logits). The kept set does
not depend on temperature.
"""

from __future__ import annotations

import math

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, mask, register, row_sum
from cortexlab.sampling.facts import derive, row_max

import mlx.core as mx


@register("top_n_sigma")
class TopNSigma:
    """Processor: mask logits below ``max - n·σ`` (σ over the row's finite logits)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with top_n_sigma > 0."""
        return not params.is_greedy and params.top_n_sigma > 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        is_finite = logits > -mx.inf
        count = mx.maximum(is_finite.sum(axis=-1, keepdims=True), 1).astype(mx.float32)
        finite = mx.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)  # masked entries: 0
        mean = row_sum(finite) / count
        variance = mx.maximum(row_sum(finite * finite) / count - mean**2, 0)
        n = batch.column(lambda p: p.top_n_sigma if self.is_active(p) else math.inf)
        threshold = row_max(batch, logits) - n * mx.sqrt(variance)
        # Inactive rows: max - inf (or inf * 0 = nan when every logit is equal): keep all.
        threshold = mx.where(mx.isnan(threshold), -mx.inf, threshold)
        return derive(batch, logits, mask(logits, logits < threshold), threshold=threshold)
