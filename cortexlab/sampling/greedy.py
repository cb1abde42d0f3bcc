"""Greedy selection: the most likely token, for rows with temperature 0."""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, stages

import mlx.core as mx


@stages.register("greedy")
class Greedy:
    """Selector: argmax per row (no softmax: the argmax of logits is the argmax of probs)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Greedy rows are those with temperature 0."""
        return params.is_greedy

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Token ids ``[b]`` (int32)."""
        return mx.argmax(logits, axis=-1).astype(mx.int32)
