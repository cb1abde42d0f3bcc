"""Logit bias: add a per-request value to chosen tokens' logits (-inf bans a token).

Source: OpenAI API ``logit_bias``; llama.cpp, vLLM, mlx-lm. Applies to greedy rows too.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, check_vocab, register, update_at

import mlx.core as mx


@register("logit_bias")
class LogitBias:
    """Processor: ``logits[token] += bias`` for each (token, bias) in ``params.logit_bias``."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with a non-empty logit_bias."""
        return bool(params.logit_bias)

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Biased logits ``[b, V]``."""
        rows, cols, values = [], [], []
        for i, params in enumerate(batch.params):
            if params.logit_bias:
                check_vocab("logit_bias", params.logit_bias, logits.shape[-1])
                rows += [i] * len(params.logit_bias)
                cols += params.logit_bias.keys()
                values += params.logit_bias.values()
        return update_at(logits, rows, cols, values, add=True)
