"""Allowed tokens: restrict a row to a given set of token ids (everything else -inf).

Source: vLLM ``allowed_token_ids``; the building block of constrained decoding.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, check_vocab, mask, register

import mlx.core as mx


@register("allowed_tokens")
class AllowedTokens:
    """Processor: keep only ``params.allowed_token_ids`` in rows that set them."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with allowed_token_ids set."""
        return params.allowed_token_ids is not None

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        num_rows, vocab_size = logits.shape
        flat = []
        for i, params in enumerate(batch.params):
            if params.allowed_token_ids is not None:
                check_vocab("allowed_token_ids", params.allowed_token_ids, vocab_size)
                flat += [i * vocab_size + t for t in params.allowed_token_ids]
        # Unrestricted rows start all-allowed; restricted rows start empty and get their ids.
        start = batch.column(lambda p: p.allowed_token_ids is None)
        allowed = mx.broadcast_to(start, (num_rows, vocab_size)).reshape(-1)
        allowed[mx.array(flat, dtype=mx.int64)] = 1.0
        return mask(logits, allowed.reshape(num_rows, vocab_size) < 0.5)
