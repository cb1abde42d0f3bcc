"""Greedy selection: the most likely token, for rows with temperature 0.

Greedy rows still go through the biases, masks and penalties (as in mlx-lm and vLLM);
temperature and the truncations cannot change the argmax and skip them.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, Selection, register
from cortexlab.sampling.facts import log_normaliser

import mlx.core as mx


@register("greedy")
class Greedy:
    """Selector: argmax per row (no softmax: the argmax of logits is the argmax of probs)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Greedy rows are those with temperature 0."""
        return params.is_greedy

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Token ids ``[b]`` (int32)."""
        return self.select(logits, batch).tokens

    def select(self, logits: mx.array, batch: SamplingBatch) -> Selection:
        """Tokens, their log-probability under softmax(logits), and a finiteness flag."""
        tokens = mx.argmax(logits, axis=-1)
        value = mx.take_along_axis(logits, tokens[:, None], axis=-1).astype(mx.float32)
        # An all -inf row has a -inf maximum; a NaN may be picked as one.
        is_finite = mx.isfinite(value).reshape(-1)
        as_float = logits if logits.dtype == mx.float32 else logits.astype(mx.float32)
        logprob = (value - log_normaliser(batch, as_float, check=False)).reshape(-1)
        return Selection(tokens.astype(mx.int32), logprob, is_finite)
