"""DRY ("don't repeat yourself"): penalise the token that would extend a repeat of an
earlier sequence, by ``multiplier * base ** (length - allowed_length)`` for repeats of at
least ``allowed_length`` tokens; matching stops at sequence breakers.

Source: p-e-w, text-generation-webui PR #5677 (2024); llama.cpp ``dry``. Breakers given as
text become the last token of ``encode("a" + text)`` (text-generation-webui's rule).
Matches are capped at 50 tokens, as there. Positions of every token are kept
incrementally in the sampler state, so a step looks only at earlier occurrences of the
last token.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, register, update_at
from cortexlab.sampling.state import SamplerState

import mlx.core as mx

MAX_MATCH_LENGTH = 50


def breaker_ids(state: SamplerState, params: SamplingParams) -> frozenset[int]:
    """The row's sequence breakers as token ids (text resolved with the state's tokenizer)."""
    key = ("dry_breakers", params.dry_sequence_breakers)
    if key not in state.memo:
        ids = set()
        for breaker in params.dry_sequence_breakers:
            if isinstance(breaker, int):
                ids.add(breaker)
            elif state.tokenizer is not None:
                ids.update(state.tokenizer.encode("a" + breaker)[-1:])
        state.memo[key] = frozenset(ids)
    return state.memo[key]


def dry_penalties(state: SamplerState, params: SamplingParams) -> dict[int, float]:
    """Token -> penalty for one row, from its history."""
    n = state.num_tokens
    breakers = breaker_ids(state, params)
    if n < 2 or (last := state.token(n - 1)) in breakers:
        return {}
    lengths: dict[int, int] = {}
    for i in state.positions(last):
        if i >= n - 1 or (following := state.token(i + 1)) in breakers:
            continue
        length = 1  # the last token itself matches
        while length < MAX_MATCH_LENGTH and i - length >= 0:
            previous = state.token(n - 1 - length)
            if state.token(i - length) != previous or previous in breakers:
                break
            length += 1
        lengths[following] = max(length, lengths.get(following, 0))
    return {
        token: params.dry_multiplier * params.dry_base ** (length - params.dry_allowed_length)
        for token, length in lengths.items()
        if length >= params.dry_allowed_length
    }


@register("dry")
class DRY:
    """Processor: subtract each row's DRY penalties (host-side matching, one scatter)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with dry_multiplier > 0."""
        return params.dry_multiplier > 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Penalised logits ``[b, V]``."""
        rows, cols, values = [], [], []
        for i, (params, state) in enumerate(zip(batch.params, batch.states, strict=True)):
            if self.is_active(params):
                for token, penalty in dry_penalties(state, params).items():
                    if token < logits.shape[-1]:
                        rows.append(i)
                        cols.append(token)
                        values.append(-penalty)
        return update_at(logits, rows, cols, values, add=True)
