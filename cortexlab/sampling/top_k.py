"""Top-k: keep each row's k largest logits, mask the rest to -inf.

Source: Fan, Lewis & Dauphin, "Hierarchical Neural Story Generation" (2018). Ties at the
k-th value all survive (Hugging Face's and vLLM's rule; llama.cpp and mlx-lm keep exactly k).
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import NEG_INF, SamplingBatch, mask, register
from cortexlab.sampling.facts import candidates, claim, derive, is_fast

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


@register("top_k")
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
        k_max = max(k for k in ks if k < vocab_size)
        if not (is_fast(batch, logits) and k_max < batch.num_candidates):
            kth = kth_largest(logits, ks)
            return derive(batch, logits, mask(logits, logits < kth), threshold=kth)
        # The k-th value is read off the shared top-C candidates (no extra selection).
        _, values = candidates(batch, logits)
        position = mx.array([[min(k, vocab_size) - 1] for k in ks])
        kth = mx.take_along_axis(values, mx.minimum(position, values.shape[-1] - 1), axis=-1)
        kth = mask(kth, mx.array([[k >= vocab_size] for k in ks]))
        out = mask(logits, logits < kth)
        is_everywhere = max(ks) < vocab_size
        if is_everywhere:
            # The candidates hold every kept token unless the k-th value ties the last one.
            claim(batch, (kth > values[:, -1:]).reshape(-1))
        return derive(batch, logits, out, threshold=kth, covers=is_everywhere)
