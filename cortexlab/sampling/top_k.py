"""Top-k: keep each row's k largest logits, mask the rest to -inf."""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import NEG_INF, SamplingBatch, mask, stages

import mlx.core as mx


def effective_top_k(params: SamplingParams, vocab_size: int) -> int:
    """The k a row really keeps: ``vocab_size`` when top-k is off (0) or k >= V."""
    k = params.top_k
    return k if not params.is_greedy and 0 < k < vocab_size else vocab_size


def kth_largest(logits: mx.array, ks: list[int]) -> mx.array:
    """Per-row k-th largest value ``[b, 1]`` (-inf where k >= V), via one top-(max k)."""
    vocab_size = logits.shape[-1]
    k_max = min(max(ks), vocab_size)
    # topk is a partial selection (O(V)); only its k_max survivors get sorted.
    top = mx.sort(mx.topk(logits, k_max, axis=-1), axis=-1)  # ascending
    position = mx.array([[k_max - min(k, k_max)] for k in ks])
    kth = mx.take_along_axis(top, position, axis=-1)
    off = mx.array([[k >= vocab_size] for k in ks])
    return mx.where(off, NEG_INF, kth)


@stages.register("top_k")
class TopK:
    """Processor: mask logits below each row's k-th largest (ties at the boundary survive)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with top_k > 0."""
        return not params.is_greedy and params.top_k > 0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        vocab_size = logits.shape[-1]
        ks = [effective_top_k(p, vocab_size) for p in batch.params]
        if min(ks) >= vocab_size:
            return logits
        return mask(logits, logits < kth_largest(logits, ks))
