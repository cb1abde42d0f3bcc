"""Random selection: one draw per row from softmax(logits), seeded by (request seed, step).

Inverse-CDF sampling with one uniform per row. The uniform comes from hashing the row's
(seed, step) in Python with SplitMix64, so a request's token depends only on its own
seed, step and logits row: not on batch position, batch neighbours or MLX's global RNG.
It also needs one exp per logit and no per-logit random numbers, where Gumbel-max needs
a random number and two logs per logit (~2x slower on CPU).
"""

from __future__ import annotations

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, exp, stages

import mlx.core as mx

_MASK64 = (1 << 64) - 1
_UNIFORM_BITS = 24  # float32 holds 24 bits exactly, so u * total never rounds up to total


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit function of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_uniform(seed: int, step: int) -> float:
    """The uniform in [0, 1) that decides `step`'s token for a request seeded `seed`."""
    # Fold the step into the hashed seed (JAX fold_in style), then hash again.
    mixed = splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (mixed >> (64 - _UNIFORM_BITS)) / (1 << _UNIFORM_BITS)


@stages.register("categorical")
class Categorical:
    """Selector: token ``i`` with probability softmax(logits)[i] (-inf logits never drawn)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Rows with temperature > 0 draw at random."""
        return not params.is_greedy

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Token ids ``[b]`` (int32)."""
        uniforms = [row_uniform(s, t) for s, t in zip(batch.seeds, batch.steps, strict=True)]
        weights = exp(logits - logits.max(axis=-1, keepdims=True))
        cdf = mx.cumsum(weights, axis=-1)
        target = mx.array(uniforms, dtype=mx.float32)[:, None] * cdf[:, -1:]
        # Token = first index whose CDF exceeds the target. Zero-weight (masked) tokens
        # repeat the previous CDF value, so they can never be that first index.
        token = (cdf <= target).sum(axis=-1)
        return mx.minimum(token, logits.shape[-1] - 1).astype(mx.int32)
