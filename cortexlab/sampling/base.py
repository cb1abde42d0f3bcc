"""What every sampling stage shares: the registry, the stage contract, the per-row inputs.

A stage is a small callable over ``[b, V]`` float logits whose rows line up with a
:class:`SamplingBatch`. Two roles:

* *processors* (logit_bias, penalties, temperature, top_k, top_p, ...) return new logits;
  they run in the row's order (see ``order.py``);
* *selectors* (``greedy``, ``categorical``) turn logits into int32 token ids ``[b]``.

Register a class (or any zero-argument factory) with ``@register(name)``; a plain function
``fn(logits, batch) -> logits`` registers too (it is active for every row). Optional
methods: ``validate(params)`` (raise ValueError; checks ``params.extra``) and
``observe(state, params, token, logprob)`` (after the step's sync: update per-request state).
Stages never force evaluation (no ``mx.eval``, ``.item()``, ``.tolist()``): the engine syncs
once per step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cortexlab.registry import Registry
from cortexlab.request import SamplingParams
from cortexlab.sampling.state import SamplerState

import mlx.core as mx
import numpy as np

NUM_CANDIDATES = 256  # top candidates the truncation stages work on before any full sort


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row inputs that line up with the logits rows a stage receives.

    `states` carry each row's token history (prompt and output, by reference) and stage
    state; `num_candidates` is how many top tokens truncations may restrict themselves to
    (>= vocabulary size: exact full-vocabulary algorithms); `scratch` holds per-call facts
    that stages share (see ``facts.py``).
    """

    params: tuple[SamplingParams, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    states: tuple[SamplerState, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    num_candidates: int = NUM_CANDIDATES
    scratch: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.states:
            object.__setattr__(self, "states", tuple(SamplerState() for _ in self.params))

    def __len__(self) -> int:
        return len(self.params)

    def rows(self, indices: Sequence[int], **changes: Any) -> SamplingBatch:
        """The sub-batch holding `indices`, in that order (fresh scratch)."""
        return SamplingBatch(
            tuple(self.params[i] for i in indices),
            tuple(self.seeds[i] for i in indices),
            tuple(self.steps[i] for i in indices),
            tuple(self.states[i] for i in indices),
            changes.get("eos_token_ids", self.eos_token_ids),
            changes.get("num_candidates", self.num_candidates),
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


@dataclass(frozen=True, slots=True)
class Selection:
    """What a selector returns (all lazy, ``[b]``): tokens, their log-probability under the
    final distribution, and whether the row was well-formed (finite, not all filtered)."""

    tokens: mx.array
    logprob: mx.array
    is_finite: mx.array


class FunctionStage:
    """A plain ``fn(logits, batch) -> logits`` as a stage, active for every row."""

    def __init__(self, fn: Callable[[mx.array, SamplingBatch], mx.array], name: str = "") -> None:
        self.fn, self.name = fn, name or getattr(fn, "__name__", "stage")

    def is_active(self, params: SamplingParams) -> bool:
        """Always: the function decides per row itself."""
        return True

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """The function's logits."""
        return self.fn(logits, batch)


stages: Registry[Stage] = Registry("sampling stage")


def _is_stage_function(obj: Any) -> bool:
    if isinstance(obj, type) or not callable(obj):
        return False
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def register(name: str) -> Callable:
    """Decorator: a stage class, zero-argument factory or ``fn(logits, batch)`` under `name`."""

    def deco(obj: Any) -> Any:
        if _is_stage_function(obj):
            stages.register(name)(lambda: FunctionStage(obj, name))
        else:
            stages.register(name)(obj)
        return obj

    return deco


def available() -> list[str]:
    """Registered stage names (processors and selectors), sorted."""
    return stages.available()


NEG_INF = float("-inf")
_LOG2_E = 1.0 / math.log(2.0)

# MLX's CPU backend evaluates mx.exp and mx.where element by element: on 16 x 49152
# logits they take ~9 ms and ~3 ms, where the vectorised rewrites below take ~3.5 ms and
# ~0.8 ms. Sampling runs every step, so the stages use these helpers. (An exp built from
# arithmetic alone measured ~2.3 ms at 16 rows but 3-6x slower at some batch sizes.)


def exp(x: mx.array) -> mx.array:
    """``e**x`` computed as ``2**(x·log2 e)`` (same float32 accuracy, ~3x faster on CPU)."""
    return mx.power(2.0, x * _LOG2_E)


def mask(x: mx.array, drop: mx.array) -> mx.array:
    """`x` with -inf where the boolean `drop` (broadcastable to `x`) is true."""
    # min(x, +inf) = x and min(x, -inf) = -inf: a select without mx.where.
    return mx.minimum(x, (0.5 - drop) * math.inf)


_SUM_CHUNK = 128


def row_sum(x: mx.array) -> mx.array:
    """Per-row sum ``[b, 1]``, in two levels when V allows.

    MLX's CPU sum accumulates a row sequentially: over 49152 float32 weights it is off by
    ~1e-4 relative and takes ~0.7 ms for 16 rows; summing 128-wide columns first is ~1e-6
    relative and ~4x faster. Rows stay independent, so the result does not depend on the
    batch.
    """
    rows, vocab_size = x.shape
    if vocab_size % _SUM_CHUNK or vocab_size < 4 * _SUM_CHUNK:
        return x.sum(axis=-1, keepdims=True)
    return x.reshape(rows, -1, _SUM_CHUNK).sum(axis=1).sum(axis=-1, keepdims=True)


def flat_index(rows, cols, vocab_size: int) -> mx.array:
    """Indices into ``logits.reshape(-1)`` for the entries ``[rows[i], cols[i]]``."""
    rows = np.asarray(rows, dtype=np.int64)
    return mx.array(rows * vocab_size + np.asarray(cols, dtype=np.int64))


def update_at(logits: mx.array, rows, cols, values, *, add: bool) -> mx.array:
    """`logits` with ``[rows[i], cols[i]]`` set to (or, with `add`, increased by) `values[i]`.

    `rows`, `cols`, `values`: lists or numpy arrays (`values` also an mx.array). The (row,
    col) pairs must be distinct when setting.
    """
    if not len(rows):
        return logits
    index = flat_index(rows, cols, logits.shape[-1])
    values = values if isinstance(values, mx.array) else mx.array(np.asarray(values, np.float32))
    flat = logits.reshape(-1)
    if add:
        return flat.at[index].add(values.astype(logits.dtype)).reshape(logits.shape)
    flat[index] = values.astype(logits.dtype)
    return flat.reshape(logits.shape)


def gather_at(logits: mx.array, rows, cols) -> mx.array:
    """The values ``logits[rows[i], cols[i]]`` as a 1-D array."""
    return logits.reshape(-1)[flat_index(rows, cols, logits.shape[-1])]


def check_vocab(field_name: str, token_ids, vocab_size: int) -> None:
    """ValueError naming the first token id in `token_ids` outside ``[0, vocab_size)``."""
    for token in token_ids:
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"SamplingParams.{field_name}: token id {token} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
