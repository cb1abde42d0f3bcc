"""Min-p: keep tokens whose probability is at least min_p times the top token's.

Source: Nguyen et al., "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM
Outputs" (2024); llama.cpp, mlx-lm, Hugging Face. A token exactly at the threshold stays.
"""

from __future__ import annotations

import math

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, mask, register
from cortexlab.sampling.facts import derive, row_max

import mlx.core as mx

# p_i >= min_p * p_max  <=>  logit_i >= max + log(min_p); the slack keeps a token that is
# at the threshold in exact arithmetic but an ulp under it in float32.
LOG_TOLERANCE = 1e-6


@register("min_p")
class MinP:
    """Processor: mask logits below ``max + log(min_p)`` per row (no sort, no exp)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with min_p > 0."""
        return not params.is_greedy and params.min_p > 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        offset = batch.column(self._log_min_p)
        threshold = row_max(batch, logits) + offset
        return derive(batch, logits, mask(logits, logits < threshold), threshold=threshold)

    def _log_min_p(self, params: SamplingParams) -> float:
        if not self.is_active(params):
            return -math.inf
        return math.log(params.min_p) - LOG_TOLERANCE
