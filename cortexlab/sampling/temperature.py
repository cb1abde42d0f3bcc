"""Temperature: divide logits by T, flattening (T > 1) or sharpening (T < 1) the distribution."""

from __future__ import annotations

import mlx.core as mx

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, stages


@stages.register("temperature")
class Temperature:
    """Processor: ``logits / T`` per row; T == 1 and greedy rows pass through unchanged."""

    def is_active(self, params: SamplingParams) -> bool:
        """Only random rows with T != 1 need scaling."""
        return not params.is_greedy and params.temperature != 1.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Scaled logits ``[b, V]``."""
        # Multiply by 1/T: one division per row instead of one per vocabulary entry.
        inv_t = batch.column(lambda p: 1.0 / p.temperature if self.is_active(p) else 1.0)
        return logits * inv_t
