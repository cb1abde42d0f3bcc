"""`sample`: run a batch of logits through the stage chain and pick one token per row."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from cortexlab.request import MAX_SEED, SamplingParams
from cortexlab.sampling.base import SamplingBatch, Stage, stages

import mlx.core as mx

# Processor order. Temperature first so that top-p's nucleus is over the scaled
# distribution; top-k before top-p as in vLLM and Hugging Face. New stages slot in here.
DEFAULT_CHAIN: tuple[str, ...] = ("temperature", "top_k", "top_p")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(
    logits: mx.array, params: Sequence, seeds: Sequence, steps: Sequence
) -> SamplingBatch:
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    for name, values in (("params", params), ("seeds", seeds), ("steps", steps)):
        if len(values) != num_rows:
            raise ValueError(f"{name} has {len(values)} entries but logits has {num_rows} rows")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params must hold SamplingParams, got {p!r}")
    for s in seeds:
        if not _is_int(s) or not 0 <= s < MAX_SEED:
            raise ValueError(f"seeds must be ints in [0, 2**63), got {s!r}")
    for t in steps:
        if not _is_int(t) or t < 0:
            raise ValueError(f"steps must be ints >= 0, got {t!r}")
    return SamplingBatch(tuple(params), tuple(map(int, seeds)), tuple(map(int, steps)))


def _run(logits: mx.array, batch: SamplingBatch, chain: list[Stage], select: Stage) -> mx.array:
    for stage in chain:
        # Skipping a stage no row needs saves whole-vocabulary passes (top-p sorts).
        if any(stage.is_active(p) for p in batch.params):
            logits = stage(logits, batch)
    return select(logits, batch)


def sample(
    logits: mx.array,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],
    *,
    chain: Sequence[str | Stage] = DEFAULT_CHAIN,
) -> mx.array:
    """Token ids ``[B]`` (int32, lazy) for ``[B, V]`` logits; row i uses params/seeds/steps[i].

    `steps[i]` is the number of tokens request i has generated so far; together with
    `seeds[i]` it fixes the row's randomness, so a request's tokens do not depend on the
    rest of the batch. `chain` lists the processor stages (registered names or stage
    objects) in order. Nothing is evaluated here: the caller syncs once per step.
    """
    batch = _validate(logits, params, seeds, steps)
    if len(batch) == 0:
        return mx.zeros((0,), dtype=mx.int32)
    stage_list = [stages.create(s) for s in chain]
    greedy, categorical = stages.create("greedy"), stages.create("categorical")
    greedy_rows = [i for i, p in enumerate(batch.params) if p.is_greedy]
    if len(greedy_rows) == len(batch):
        return _run(logits, batch, stage_list, greedy)
    random_rows = [i for i, p in enumerate(batch.params) if not p.is_greedy]
    # Cumulative sums and sorts in half precision would skew the distribution.
    if len(random_rows) == len(batch):
        return _run(logits.astype(mx.float32), batch, stage_list, categorical)

    # Mixed batch: each group runs alone, then tokens go back to their original rows.
    def group(rows: list[int], select: Stage, dtype: mx.Dtype) -> mx.array:
        rows_logits = mx.take(logits, mx.array(rows), axis=0).astype(dtype)
        return _run(rows_logits, batch.rows(rows), stage_list, select)

    tokens = mx.concatenate(
        [group(greedy_rows, greedy, logits.dtype), group(random_rows, categorical, mx.float32)]
    )
    order = greedy_rows + random_rows
    inverse = [0] * len(order)
    for position, row in enumerate(order):
        inverse[row] = position
    return mx.take(tokens, mx.array(inverse))
