"""Banned tokens: token ids a row may never produce (their logits set to -inf).

Source: Hugging Face ``bad_words_ids`` / ``SuppressTokensLogitsProcessor`` (single tokens).
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import NEG_INF, SamplingBatch, check_vocab, register, update_at

import mlx.core as mx


def ban(logits: mx.array, rows: list[int], cols: list[int]) -> mx.array:
    """`logits` with -inf at each distinct (row, col)."""
    pairs = sorted(set(zip(rows, cols, strict=True)))
    return update_at(
        logits, [r for r, _ in pairs], [c for _, c in pairs], [NEG_INF] * len(pairs), add=False
    )


@register("banned_tokens")
class BannedTokens:
    """Processor: -inf at ``params.banned_token_ids``."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with banned_token_ids."""
        return bool(params.banned_token_ids)

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        rows, cols = [], []
        for i, params in enumerate(batch.params):
            check_vocab("banned_token_ids", params.banned_token_ids, logits.shape[-1])
            rows += [i] * len(params.banned_token_ids)
            cols += params.banned_token_ids
        return ban(logits, rows, cols)
