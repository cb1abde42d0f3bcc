"""Facts about a logits array that later stages reuse, so a chain pays for one exp pass.

Each built-in stage records what it knows about the array it returns: the row max, the
unnormalised weights ``exp(x - max)``, and the top-C candidates (ids sorted by value, with
the array's values at them). A truncation that keeps few tokens (top-k, top-p, typical)
marks the candidates as *covering* the support; the selector then draws among C tokens
instead of the whole vocabulary, and unused full-size arrays are never computed (MLX is
lazy). Candidate shortcuts are checked row by row (``claim``); a row whose check fails
after the step's sync is sampled again with more candidates, and finally with exact
full-vocabulary algorithms (``num_candidates >= V``), so results never depend on C.

Facts live in ``batch.scratch`` keyed by array identity; a stage written elsewhere returns
an array without facts, and everything after it simply recomputes what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cortexlab.sampling.base import SamplingBatch, exp, mask, row_sum

import mlx.core as mx

_BLOCK = 16  # tokens per block in the two-level top-C selection
_CLAMP = -1e30  # stands in for -inf where 0 * -inf would give nan


@dataclass(slots=True)
class Facts:
    """What is known (lazily) about one logits array ``[b, V]``."""

    logits: mx.array  # kept so that id(logits) stays unique while the facts live
    max: mx.array | None = None  # [b, 1]
    weights: mx.array | None = None  # [b, V] exp(logits - max), 0 where -inf
    cand_idx: mx.array | None = None  # [b, C] token ids, values descending
    cand_vals: mx.array | None = None  # [b, C] the array's values there (-inf: dropped)
    covers: bool = False  # every kept token is a candidate (checked per row by `claim`)


def facts(batch: SamplingBatch, x: mx.array) -> Facts:
    """The facts recorded for `x` (empty ones if none)."""
    known = batch.scratch.get(id(x))
    if known is None or known.logits is not x:
        known = batch.scratch[id(x)] = Facts(x)
    return known


def is_fast(batch: SamplingBatch, x: mx.array) -> bool:
    """Whether candidate shortcuts apply (fewer candidates than vocabulary entries)."""
    return batch.num_candidates < x.shape[-1]


def row_max(batch: SamplingBatch, x: mx.array) -> mx.array:
    """Per-row max ``[b, 1]``."""
    known = facts(batch, x)
    if known.max is None:
        source = known.cand_vals if known.covers else x
        known.max = source.max(axis=-1, keepdims=True)
    return known.max


def weights(batch: SamplingBatch, x: mx.array) -> mx.array:
    """Unnormalised probabilities ``exp(x - max)`` ``[b, V]`` (one exp pass, shared)."""
    known = facts(batch, x)
    if known.weights is None:
        known.weights = exp(x - row_max(batch, x))
    return known.weights


def log_normaliser(batch: SamplingBatch, x: mx.array, *, check: bool = True) -> mx.array:
    """``logsumexp(x)`` per row ``[b, 1]``; ``x - log_normaliser`` are log-probabilities.

    With `check`, a row whose normaliser is not finite counts as broken (``require_finite``).
    """
    key = ("lse", id(x))
    if key not in batch.scratch:
        batch.scratch[key] = row_max(batch, x) + mx.log(row_sum(weights(batch, x)))
    if check:
        require_finite(batch, batch.scratch[key])
    return batch.scratch[key]


def entropy(batch: SamplingBatch, x: mx.array) -> mx.array:
    """Shannon entropy (nats) of softmax(x) per row ``[b, 1]``."""
    w = weights(batch, x)
    total = row_sum(w)
    shifted = mx.maximum(x - row_max(batch, x), _CLAMP)
    return mx.log(total) - row_sum(w * shifted) / total


def top_candidates(x: mx.array, num: int) -> tuple[mx.array, mx.array]:
    """The `num` largest entries per row, descending: ids ``[b, num]`` and values."""
    rows, vocab_size = x.shape
    if num >= vocab_size:
        index = mx.argsort(-x, axis=-1).astype(mx.int32)
        return index, mx.take_along_axis(x, index, axis=-1)
    if vocab_size >= 4 * num * _BLOCK:
        # Two levels: the top `num` entries lie in the `num` blocks with the largest maxima
        # (each of those blocks holds an entry >= the num-th largest block max).
        pad = -vocab_size % _BLOCK
        padded = mx.concatenate([x, mx.full((rows, pad), -mx.inf, x.dtype)], -1) if pad else x
        blocks = padded.reshape(rows, -1, _BLOCK)
        best = mx.argpartition(-blocks.max(axis=-1), num - 1, axis=-1)[:, :num]
        values = mx.take_along_axis(blocks, best[:, :, None], axis=1).reshape(rows, -1)
        ids = (best[:, :, None] * _BLOCK + mx.arange(_BLOCK)[None, None, :]).reshape(rows, -1)
        part = mx.argpartition(-values, num - 1, axis=-1)[:, :num]
        index = mx.take_along_axis(ids, part, axis=-1)
    else:
        index = mx.argpartition(-x, num - 1, axis=-1)[:, :num]
    values = mx.take_along_axis(x, index, axis=-1)
    order = mx.argsort(-values, axis=-1)
    index = mx.take_along_axis(index, order, axis=-1).astype(mx.int32)
    return index, mx.take_along_axis(values, order, axis=-1)


def candidates(batch: SamplingBatch, x: mx.array) -> tuple[mx.array, mx.array]:
    """Top-C ids and values of `x` (C = ``batch.num_candidates``, at most V), descending."""
    known = facts(batch, x)
    if known.cand_idx is None:
        known.cand_idx, known.cand_vals = top_candidates(x, batch.num_candidates)
        known.covers = known.cand_idx.shape[-1] >= x.shape[-1]
        if known.max is None:
            known.max = known.cand_vals[:, :1]  # the top candidate: no extra pass for the max
    return known.cand_idx, known.cand_vals


def claim(batch: SamplingBatch, ok: mx.array) -> None:
    """Record a per-row check ``[b]`` (bool) that a candidate shortcut was exact."""
    batch.scratch.setdefault("checks", []).append(ok.reshape(-1))


def require_finite(batch: SamplingBatch, value: mx.array) -> None:
    """Record that rows whose `value` (``[b]`` or ``[b, 1]``) is NaN or inf are broken:
    they are sampled again from cleaned logits (a NaN may hide outside the candidates)."""
    flag = ((value > -mx.inf) & (value < mx.inf)).reshape(-1)
    batch.scratch.setdefault("finite", []).append(flag)


def count_kept(x: mx.array, threshold: mx.array) -> mx.array:
    """Per row, how many entries are >= `threshold` ``[b]``."""
    return (x >= threshold).sum(axis=-1)


def derive(
    batch: SamplingBatch,
    x: mx.array,
    out: mx.array,
    *,
    threshold: mx.array | None = None,
    scale: mx.array | None = None,
    keeps_top: bool = True,
    covers: bool = False,
) -> mx.array:
    """Record `out`'s facts from `x`'s and return `out`.

    `out` is `x` masked below `threshold` (tokens >= it survive), or `x * scale` (scale > 0),
    or, with neither, `x` with some entries masked to -inf (`keeps_top`: never the max).
    """
    if out is x:
        return out
    known, new = facts(batch, x), facts(batch, out)
    new.covers = known.covers or covers
    if scale is not None:
        new.max = None if known.max is None else known.max * scale
        if known.cand_idx is not None:
            new.cand_idx, new.cand_vals = known.cand_idx, known.cand_vals * scale
        return out  # weights are recomputed: exp(scaled) is not bitwise weights ** scale
    new.max = known.max if keeps_top else None
    if known.cand_idx is not None:
        new.cand_idx = known.cand_idx
        if threshold is not None:
            new.cand_vals = mask(known.cand_vals, known.cand_vals < threshold)
        else:
            new.cand_vals = mx.take_along_axis(out, known.cand_idx, axis=-1)
    if known.weights is not None and keeps_top:
        kept = x >= threshold if threshold is not None else out > -mx.inf
        new.weights = known.weights * kept
    return out
