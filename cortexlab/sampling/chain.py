"""Running a batch of logits through each row's stage order to one token per row.

``run`` builds everything lazily (the engine evaluates it in the step's one ``mx.eval``);
``Sampled.resolve`` then reads the tokens on the host. Rows are grouped by (order,
greedy): rows with different parameters but the same order share every stage call.
A row comes back for a second pass only when something was off: a candidate shortcut
that did not hold (more candidates, then exact algorithms), or a non-finite or fully
filtered row (NaN -> -inf, +inf tokens share the mass; if nothing survives, the
unfiltered argmax, recorded as a fallback). Those are the only extra syncs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

from cortexlab.request import MAX_SEED, SamplingParams
from cortexlab.sampling import metadata
from cortexlab.sampling.base import NUM_CANDIDATES, SamplingBatch, Selection, Stage, stages
from cortexlab.sampling.order import DEFAULT_ORDER, check_order, resolve
from cortexlab.sampling.state import SamplerState

import mlx.core as mx
import numpy as np

# A shortcut that failed is retried with this many times more candidates, then exactly.
CANDIDATE_GROWTH = 16


@dataclass(slots=True)
class Outcome:
    """One row's result on the host."""

    token: int
    logprob: float | None = None  # under the final distribution (when computed)
    is_fallback: bool = False  # every token was filtered out: unfiltered argmax
    stages: tuple[tuple[str, Stage], ...] = ()  # the active stages that ran for its group
    details: dict | None = None  # SamplingParams.logprobs metadata
    summary: dict | None = None  # sampler.distribution metadata


@dataclass(slots=True)
class _Group:
    rows: list[int]
    batch: SamplingBatch
    stages: list[tuple[str, Stage]]
    selection: Selection
    checks: mx.array | None
    wants_logprob: bool
    detail_rows: list[int] = field(default_factory=list)
    details: dict | None = None
    summary: dict | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def make_batch(
    logits: mx.array,
    params: Sequence,
    seeds: Sequence,
    steps: Sequence,
    states: Sequence[SamplerState] | None = None,
    **options,
) -> SamplingBatch:
    """A checked SamplingBatch for `logits` ``[B, V]``."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    columns = {
        "params": params,
        "seeds": seeds,
        "steps": steps,
        "states": states or [None] * num_rows,
    }
    for name, values in columns.items():
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
    row_states = tuple(s if s is not None else SamplerState() for s in columns["states"])
    return SamplingBatch(
        tuple(params), tuple(map(int, seeds)), tuple(map(int, steps)), row_states, **options
    )


def apply(
    x: mx.array, batch: SamplingBatch, pipeline: list[tuple[str, Stage]], record: list | None
) -> mx.array:
    """`x` through every stage of `pipeline` (appending each output to `record` if given)."""
    for name, stage in pipeline:
        x = stage(x, batch)
        if record is not None:
            record.append((name, x))
    return x


def clean(x: mx.array) -> mx.array:
    """NaN -> -inf; in a row with +inf logits those tokens share all the mass."""
    is_pos_inf = x == mx.inf
    clean = mx.nan_to_num(x, nan=-mx.inf, posinf=0.0, neginf=-mx.inf)
    certain = mx.where(is_pos_inf, 0.0, -mx.inf).astype(x.dtype)
    return mx.where(is_pos_inf.any(axis=-1, keepdims=True), certain, clean)


class Sampled:
    """A lazily sampled batch: evaluate `arrays`, then `resolve()` gives per-row Outcomes."""

    def __init__(self, logits, batch, groups, options) -> None:
        self.logits, self.batch, self.groups, self.options = logits, batch, groups, options

    @property
    def arrays(self) -> list[mx.array]:
        """Everything to evaluate (together with anything else of the step)."""
        out = []
        for g in self.groups:
            out += [g.selection.tokens, g.selection.is_finite]
            out += [g.checks] if g.checks is not None else []
            out += [g.selection.logprob] if g.wants_logprob else []
            out += list(g.details.values()) if g.details else []
            if g.summary:
                out += [g.summary["entropy"], g.summary["rank"]] + [
                    a for s in g.summary["stages"] for a in s[1:]
                ]
        return out

    def resolve(self) -> list[Outcome]:
        """Per-row outcomes in batch order; reruns the rare rows that need it (extra syncs)."""
        outcomes: list[Outcome | None] = [None] * len(self.batch)
        retry, broken = [], []
        for g in self.groups:
            tokens, finite = g.selection.tokens.tolist(), g.selection.is_finite.tolist()
            checks = g.checks.tolist() if g.checks is not None else [True] * len(g.rows)
            logprobs = g.selection.logprob.tolist() if g.wants_logprob else [None] * len(g.rows)
            details = _host_details(g)
            for j, row in enumerate(g.rows):
                if not finite[j]:
                    broken.append(row)
                elif not checks[j]:
                    retry.append(row)
                else:
                    summary = _host_summary(g.summary, j) if g.summary else None
                    outcomes[row] = Outcome(
                        tokens[j], logprobs[j], False, tuple(g.stages), details.get(j), summary
                    )
        vocab_size = self.logits.shape[-1]
        if retry:
            more = self.batch.num_candidates * CANDIDATE_GROWTH
            self._redo(outcomes, retry, min(more, vocab_size), self.options["sanitize"])
        if broken and not (self.options["sanitize"] and self.batch.num_candidates >= vocab_size):
            self._redo(outcomes, broken, vocab_size, True)
        elif broken:
            for row in broken:
                outcomes[row] = self._fallback(row)
        return outcomes  # type: ignore[return-value]

    def _redo(self, outcomes: list, rows: list[int], num_candidates: int, clean: bool) -> None:
        sub = run(
            mx.take(self.logits, mx.array(rows), axis=0),
            self.batch.rows(rows, num_candidates=num_candidates),
            **{**self.options, "sanitize": clean},
        )
        mx.eval(*sub.arrays)
        for row, outcome in zip(rows, sub.resolve(), strict=True):
            outcomes[row] = outcome

    def _fallback(self, row: int) -> Outcome:
        raw = np.array(clean(self.logits[row : row + 1].astype(mx.float32)))[0]
        token = int(np.argmax(raw))
        details = None
        if self.batch.params[row].logprobs is not None:
            finite = raw[np.isfinite(raw)]
            lse = (
                float(np.log(np.exp(finite - finite.max()).sum()) + finite.max())
                if finite.size
                else 0.0
            )
            raw_lp = float(raw[token] - lse) if finite.size else -math.inf
            details = {"logprob": raw_lp, "rank": 1, "raw_logprob": raw_lp, "top": []}
        return Outcome(token, None, True, (), details, None)


def _hashable(order: object) -> object:
    """`order` as a dict key (an order holding unhashable stage objects: by identity)."""
    try:
        hash(order)
    except TypeError:
        return ("unhashable order", id(order))
    return order


def _host_details(g: _Group) -> dict[int, dict]:
    if not g.details:
        return {}
    host = {k: v.tolist() for k, v in g.details.items()}
    out = {}
    for n, j in enumerate(g.detail_rows):
        k = g.batch.params[j].logprobs or 0
        top = (
            list(zip(host["top_ids"][n][:k], host["top_logprobs"][n][:k], strict=True)) if k else []
        )
        out[j] = {
            "logprob": host["logprob"][n],
            "rank": host["rank"][n],
            "raw_logprob": host["raw_logprob"][n],
            "top": top,
        }
    return out


def _host_summary(summary: dict, j: int) -> dict:
    return {
        "entropy": summary["entropy"][j].item(),
        "rank": summary["rank"][j].item(),
        "stages": [
            {
                "stage": name,
                "num_kept": kept[j].item(),
                "top_ids": ids[j].tolist(),
                "top_probs": probs[j].tolist(),
            }
            for name, kept, ids, probs in summary["stages"]
        ],
    }


def run(
    logits: mx.array,
    batch: SamplingBatch,
    *,
    order: str | Sequence = DEFAULT_ORDER,
    record: bool = False,
    sanitize: bool = False,
) -> Sampled:
    """Sample `batch` lazily: every row through its order (``params.order`` or `order`).

    `record` adds, per row, each stage's kept count and top candidates and the final
    entropy (the ``sampler.distribution`` hook); `sanitize` cleans NaN / inf logits first.
    """
    options = {"order": order, "record": record, "sanitize": sanitize}
    keys: dict = {}
    for i, p in enumerate(batch.params):
        row_order = p.order if p.order is not None else order
        keys.setdefault((_hashable(row_order), p.is_greedy), (row_order, []))[1].append(i)
    groups = []
    for (_, is_greedy), (row_order, rows) in keys.items():
        pipeline = resolve(row_order)
        if len(rows) == len(batch):
            x, gbatch = logits, batch
        else:
            x, gbatch = mx.take(logits, mx.array(rows), axis=0), batch.rows(rows)
        if not is_greedy:
            x = x.astype(mx.float32)  # sums and sorts in half precision would skew it
        groups.append(
            _group(clean(x) if sanitize else x, gbatch, rows, pipeline, is_greedy, record)
        )
    return Sampled(logits, batch, groups, options)


_ACTIVE: dict = {}  # (id(pipeline), id(params)) -> (pipeline, params, is_active per stage)


def _active_mask(pipeline: list, params: SamplingParams) -> tuple[bool, ...]:
    """Which stages of `pipeline` act on rows with `params` (memoised: params are frozen;
    ``is_active`` depends on the params only)."""
    key = (id(pipeline), id(params))
    hit = _ACTIVE.get(key)
    if hit is None or hit[0] is not pipeline or hit[1] is not params:
        if len(_ACTIVE) > 4096:
            _ACTIVE.clear()
        hit = _ACTIVE[key] = (pipeline, params, tuple(s.is_active(params) for _, s in pipeline))
    return hit[2]


def _group(x, batch: SamplingBatch, rows, pipeline, is_greedy: bool, record: bool) -> _Group:
    """One group's lazy work: its active stages, the selection, checks and metadata."""
    unique = list({id(p): p for p in batch.params}.values())
    masks = [_active_mask(pipeline, p) for p in unique]
    active = [stage for stage, *flags in zip(pipeline, *masks, strict=True) if any(flags)]
    recorded = [("input", x)] if record else None
    final = apply(x, batch, active, recorded)
    selection = stages.create("greedy" if is_greedy else "categorical").select(final, batch)
    for flag in batch.scratch.get("finite", ()):
        selection = Selection(selection.tokens, selection.logprob, selection.is_finite & flag)
    check = None
    for flag in batch.scratch.get("checks", ()):
        check = flag if check is None else check & flag
    observers = [s for _, s in active if hasattr(s, "observe")]
    wants_logprob = record or any(s.is_active(p) for s in observers for p in unique)
    group = _Group(rows, batch, active, selection, check, wants_logprob)
    group.detail_rows = [j for j, p in enumerate(batch.params) if p.logprobs is not None]
    if group.detail_rows:
        k = max(batch.params[j].logprobs for j in group.detail_rows)
        arrays, facts_batch = (final, x, selection.tokens), batch
        if len(group.detail_rows) < len(rows):
            index = mx.array(group.detail_rows)
            arrays = tuple(mx.take(a, index, axis=0) for a in arrays)
            facts_batch = batch.rows(group.detail_rows)
        group.details = metadata.token_details(facts_batch, *arrays, k)
    if record:
        group.summary = metadata.stage_summaries(batch, recorded, selection.tokens)
    return group


def sample(
    logits: mx.array,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],
    *,
    order: str | Sequence = DEFAULT_ORDER,
    states: Sequence[SamplerState] | None = None,
    eos_token_ids: Sequence[int] = (),
    num_candidates: int = NUM_CANDIDATES,
) -> mx.array:
    """Token ids ``[B]`` (int32, evaluated) for ``[B, V]`` logits; row i uses params[i] etc.

    `steps[i]` is the number of tokens request i has generated so far; together with
    `seeds[i]` it fixes the row's randomness, so a request's tokens do not depend on the
    rest of the batch. `order` is a preset name or a list of stages (``params.order``
    overrides it per row); `states` give rows their token history. Stateless otherwise:
    nothing is written back (mirostat's mu stays at its start value).
    """
    check_order(order)
    batch = make_batch(
        logits,
        params,
        seeds,
        steps,
        states,
        eos_token_ids=tuple(eos_token_ids),
        num_candidates=num_candidates,
    )
    if len(batch) == 0:
        return mx.zeros((0,), dtype=mx.int32)
    sampled = run(logits, batch, order=order)
    mx.eval(*sampled.arrays)
    return mx.array([o.token for o in sampled.resolve()], dtype=mx.int32)
