"""Temperature: divide logits by T, flattening (T > 1) or sharpening (T < 1) the distribution.

Source: Ackley, Hinton & Sejnowski (1985); every engine. T = 0 means greedy (the argmax).
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, register
from cortexlab.sampling.facts import derive

import mlx.core as mx

MAX_INVERSE_TEMPERATURE = 1e30


@register("temperature")
class Temperature:
    """Processor: ``logits / T`` per row; T == 1 and greedy rows pass through unchanged."""

    def is_active(self, params: SamplingParams) -> bool:
        """Only random rows with T != 1 need scaling."""
        return not params.is_greedy and params.temperature != 1.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Scaled logits ``[b, V]``."""
        # Multiply by 1/T: one division per row instead of one per vocabulary entry.
        scale = batch.column(self._inverse)
        return derive(batch, logits, logits * scale, scale=scale)

    def _inverse(self, params: SamplingParams) -> float:
        if not self.is_active(params):
            return 1.0
        # The cap keeps a vanishing T from making the top logit inf (inf - inf = nan later).
        return min(1.0 / params.temperature, MAX_INVERSE_TEMPERATURE)
