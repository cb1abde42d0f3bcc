"""Min tokens: EOS and the stop token ids cannot be drawn until a row has min_tokens.

Source: vLLM ``min_tokens``; Hugging Face ``MinNewTokensLengthLogitsProcessor``.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.banned_tokens import ban
from cortexlab.sampling.base import SamplingBatch, register

import mlx.core as mx


@register("min_tokens")
class MinTokens:
    """Processor: -inf at EOS (unless ignore_eos) and stop_token_ids while step < min_tokens."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with min_tokens > 0 (the step decides whether they still need it)."""
        return params.min_tokens > 0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        vocab_size = logits.shape[-1]
        rows, cols = [], []
        for i, (params, step) in enumerate(zip(batch.params, batch.steps, strict=True)):
            if step < params.min_tokens:
                eos = () if params.ignore_eos else batch.eos_token_ids
                stops = [t for t in (*eos, *params.stop_token_ids) if t < vocab_size]
                rows += [i] * len(stops)
                cols += stops
        return ban(logits, rows, cols)
