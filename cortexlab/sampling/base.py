"""What every sampling stage shares: the registry, the stage contract, the per-row inputs.

A stage is a small callable over ``[b, V]`` float logits whose rows line up with a
:class:`SamplingBatch`. Two roles:

* *processors* (temperature, top_k, top_p, ...) return new logits; they run in chain order;
* *selectors* (``greedy``, ``categorical``) turn logits into int32 token ids ``[b]``.

Register a class (or any zero-argument factory): ``stages.create(name)`` builds the
stage. Stages never force evaluation (no ``mx.eval``, ``.item()``, ``.tolist()``):
``sample`` stays lazy so the engine syncs once per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cortexlab.registry import Registry
from cortexlab.request import SamplingParams

import mlx.core as mx


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row inputs that line up with the logits rows a stage receives."""

    params: tuple[SamplingParams, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.params)

    def rows(self, indices: Sequence[int]) -> SamplingBatch:
        """The sub-batch holding `indices`, in that order."""
        return SamplingBatch(
            tuple(self.params[i] for i in indices),
            tuple(self.seeds[i] for i in indices),
            tuple(self.steps[i] for i in indices),
        )

    def column(
        self, value: Callable[[SamplingParams], float | int], dtype: mx.Dtype = mx.float32
    ) -> mx.array:
        """One value per row as a ``[b, 1]`` array, ready to broadcast against ``[b, V]``."""
        return mx.array([value(p) for p in self.params], dtype=dtype)[:, None]


@runtime_checkable
class Stage(Protocol):
    """A sampling stage: processors return logits ``[b, V]``, selectors token ids ``[b]``."""

    def is_active(self, params: SamplingParams) -> bool:
        """Whether this stage changes anything for a row with these params."""
        ...

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Apply to every row; rows where the stage is inactive must come back unchanged."""
        ...


stages: Registry[Stage] = Registry("sampling stage")

NEG_INF = float("-inf")
_LOG2_E = 1.0 / math.log(2.0)

# MLX's CPU backend evaluates mx.exp and mx.where element by element: on 16 x 49152
# logits they take ~9 ms and ~3 ms, where the vectorised rewrites below take ~4 ms and
# ~0.8 ms. Sampling runs every step, so the stages use these helpers.


def exp(x: mx.array) -> mx.array:
    """``e**x`` computed as ``2**(x·log2 e)`` (same float32 accuracy, ~3x faster on CPU)."""
    return mx.power(2.0, x * _LOG2_E)


def mask(x: mx.array, drop: mx.array) -> mx.array:
    """`x` with -inf where the boolean `drop` (broadcastable to `x`) is true."""
    # min(x, +inf) = x and min(x, -inf) = -inf: a select without mx.where.
    return mx.minimum(x, (0.5 - drop) * math.inf)
