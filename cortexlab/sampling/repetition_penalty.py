"""Repetition penalty (CTRL): for each distinct token already in the context, divide a
positive logit by the penalty and multiply a negative one by it (once per token).

Source: Keskar et al., "CTRL: A Conditional Transformer Language Model for Controllable
Generation" (2019); Hugging Face, llama.cpp, mlx-lm. The context is prompt + output, or
its last ``repetition_window`` tokens (mlx-lm's ``repetition_context_size``).
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, gather_at, register, update_at

import mlx.core as mx
import numpy as np


@register("repetition_penalty")
class RepetitionPenalty:
    """Processor: sign-aware division by ``repetition_penalty`` at tokens seen before."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with repetition_penalty != 1."""
        return params.repetition_penalty != 1.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Penalised logits ``[b, V]``."""
        rows, cols, penalties = [], [], []
        for i, (params, state) in enumerate(zip(batch.params, batch.states, strict=True)):
            if self.is_active(params):
                ids = state.context_ids(params.repetition_window)
                ids = ids[ids < logits.shape[-1]]
                rows.append(np.full(len(ids), i))
                cols.append(ids)
                penalties.append(np.full(len(ids), params.repetition_penalty, np.float32))
        if not rows or not sum(map(len, rows)):
            return logits
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        seen = gather_at(logits, rows, cols).astype(mx.float32)
        penalty = mx.array(np.concatenate(penalties))
        # Two branches on a few thousand entries: mx.where is cheap at this size.
        penalised = mx.where(seen < 0, seen * penalty, seen / penalty)
        return update_at(logits, rows, cols, penalised, add=False)
