"""Random selection: one draw per row from softmax(logits), seeded by (request seed, step).

Inverse-CDF sampling with one uniform per row. The uniform comes from hashing the row's
(seed, step) in Python with SplitMix64, so a request's token depends only on its own
seed, step and logits row: not on batch position, batch neighbours or MLX's global RNG.
It also needs one exp per logit and no per-logit random numbers, where Gumbel-max needs
a random number and two logs per logit (~2x slower on CPU). When a truncation left few
candidates (``facts.covers``), the draw runs over those candidates in vocabulary order,
which gives bitwise the same token as the full-vocabulary CDF.
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, Selection, exp, register
from cortexlab.sampling.facts import facts, row_max, weights

import mlx.core as mx

_MASK64 = (1 << 64) - 1
_UNIFORM_BITS = 24  # float32 holds 24 bits exactly, so u * total never rounds up to total


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit function of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_uniform(seed: int, step: int, stream: int = 0) -> float:
    """The uniform in [0, 1) that decides `step`'s token for a request seeded `seed`.

    `stream` picks an independent sequence for other per-step coins (XTC uses 1).
    """
    # Fold the step into the hashed seed (JAX fold_in style), then hash again.
    mixed = splitmix64(splitmix64((seed ^ (stream << 62)) & _MASK64) ^ (step & _MASK64))
    return (mixed >> (64 - _UNIFORM_BITS)) / (1 << _UNIFORM_BITS)


@register("categorical")
class Categorical:
    """Selector: token ``i`` with probability softmax(logits)[i] (-inf logits never drawn)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with temperature > 0 draw at random."""
        return not params.is_greedy

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Token ids ``[b]`` (int32)."""
        return self.select(logits, batch).tokens

    def select(self, logits: mx.array, batch: SamplingBatch) -> Selection:
        """Tokens, their log-probability under softmax(logits), and a finiteness flag."""
        uniforms = [row_uniform(s, t) for s, t in zip(batch.seeds, batch.steps, strict=True)]
        known, top = facts(batch, logits), row_max(batch, logits)
        ids = None
        if known.covers and known.cand_idx is not None:
            order = mx.argsort(known.cand_idx, axis=-1)
            ids = mx.take_along_axis(known.cand_idx, order, axis=-1)
            w = exp(mx.take_along_axis(known.cand_vals, order, axis=-1) - top)
        else:
            w = weights(batch, logits)
        cdf = mx.cumsum(w, axis=-1)
        total = cdf[:, -1:]
        target = mx.array(uniforms, dtype=mx.float32)[:, None] * total
        # Token = first index whose CDF exceeds the target. Zero-weight (masked) tokens
        # repeat the previous CDF value, so they can never be that first index.
        position = mx.minimum((cdf <= target).sum(axis=-1, keepdims=True), w.shape[-1] - 1)
        chosen = mx.take_along_axis(w, position, axis=-1)
        tokens = position if ids is None else mx.take_along_axis(ids, position, axis=-1)
        logprob = (mx.log(chosen) - mx.log(total)).reshape(-1)
        is_finite = ((top > -mx.inf) & (top < mx.inf) & (total > 0) & (total < mx.inf)).reshape(-1)
        return Selection(tokens.reshape(-1).astype(mx.int32), logprob, is_finite)
