"""Frequency penalty: subtract a constant times how often a token was generated.

Source: OpenAI API (``logits[j] -= frequency_penalty * count[j]``, counts over the
generated tokens only); vLLM. The counts are kept incrementally in the sampler state.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, register, update_at

import mlx.core as mx
import numpy as np


@register("frequency_penalty")
class FrequencyPenalty:
    """Processor: ``-frequency_penalty * count`` at each generated token."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with frequency_penalty != 0."""
        return params.frequency_penalty != 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Penalised logits ``[b, V]``."""
        rows, cols, values = [], [], []
        for i, (params, state) in enumerate(zip(batch.params, batch.states, strict=True)):
            if self.is_active(params):
                ids, counts = state.output_counts()
                rows += [i] * len(ids)
                cols += ids.tolist()
                values.append(-params.frequency_penalty * counts)
        if not rows:
            return logits
        return update_at(logits, rows, cols, mx.array(np.concatenate(values)), add=True)
