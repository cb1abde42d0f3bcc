"""Presence penalty: subtract a constant from every token generated at least once.

Source: OpenAI API (``logits[j] -= presence_penalty * (count[j] > 0)``, counts over the
generated tokens only); vLLM. Applies to greedy rows too.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, register, update_at

import mlx.core as mx
import numpy as np


def output_entries(batch: SamplingBatch, is_active, value) -> tuple:
    """Rows, token ids and ``value(params, counts)`` for every generated token of active rows."""
    rows, cols, values = [], [], []
    for i, (params, state) in enumerate(zip(batch.params, batch.states, strict=True)):
        if is_active(params):
            ids, counts = state.output_counts()
            rows.append(np.full(len(ids), i))
            cols.append(ids)
            values.append(value(params, counts))
    if not rows:
        return [], [], []
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(values)


@register("presence_penalty")
class PresencePenalty:
    """Processor: ``-presence_penalty`` at each distinct generated token."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with presence_penalty != 0."""
        return params.presence_penalty != 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Penalised logits ``[b, V]``."""
        rows, cols, values = output_entries(
            batch, self.is_active, lambda p, counts: np.full(len(counts), -p.presence_penalty)
        )
        return update_at(logits, rows, cols, values, add=True)
