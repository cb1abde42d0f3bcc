"""Frequency penalty: subtract a constant times how often a token was generated.

Source: OpenAI API (``logits[j] -= frequency_penalty * count[j]``, counts over the
generated tokens only); vLLM. The counts are kept incrementally in the sampler state.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, register, update_at
from cortexlab.sampling.presence_penalty import output_entries

import mlx.core as mx


@register("frequency_penalty")
class FrequencyPenalty:
    """Processor: ``-frequency_penalty * count`` at each generated token."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with frequency_penalty != 0."""
        return params.frequency_penalty != 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Penalised logits ``[b, V]``."""
        rows, cols, values = output_entries(
            batch, self.is_active, lambda p, counts: -p.frequency_penalty * counts
        )
        return update_at(logits, rows, cols, values, add=True)
