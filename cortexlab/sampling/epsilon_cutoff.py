"""Epsilon sampling: drop tokens whose probability is below a fixed epsilon (top kept).

Source: Hewitt, Manning & Liang, "Truncation Sampling as Language Model Desmoothing"
(Findings of EMNLP 2022); Hugging Face ``EpsilonLogitsWarper``.
"""

from __future__ import annotations

import math

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, mask, register
from cortexlab.sampling.facts import derive, log_normaliser, row_max

import mlx.core as mx


@register("epsilon_cutoff")
class EpsilonCutoff:
    """Processor: mask tokens with ``p < epsilon_cutoff``, never the top token."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with epsilon_cutoff > 0."""
        return not params.is_greedy and params.epsilon_cutoff > 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        log_epsilon = batch.column(
            lambda p: math.log(p.epsilon_cutoff) if self.is_active(p) else -math.inf
        )
        # p < eps  <=>  logit < logsumexp + log(eps); capped at the max so the top survives.
        threshold = mx.minimum(log_normaliser(batch, logits) + log_epsilon, row_max(batch, logits))
        return derive(batch, logits, mask(logits, logits < threshold), threshold=threshold)
