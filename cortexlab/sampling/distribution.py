"""`distribution`: the final probability vector one row draws from (research and tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch
from cortexlab.sampling.chain import apply, clean
from cortexlab.sampling.order import DEFAULT_ORDER, check_order, check_params, resolve
from cortexlab.sampling.state import SamplerState

import mlx.core as mx
import numpy as np


def distribution(
    logits: Any,
    params: SamplingParams,
    *,
    history: Sequence[int] = (),
    prompt: Sequence[int] = (),
    order: str | Sequence | None = None,
    eos_token_ids: Sequence[int] = (),
    tokenizer: Any = None,
    state: SamplerState | None = None,
    stages: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """The probabilities ``[V]`` (float64) a row with these logits and params draws from.

    `history` is the tokens generated so far (presence / frequency penalties, min_tokens,
    the XTC coin's step) and `prompt` the prompt before them (repetition penalty, DRY).
    Exact algorithms throughout (no candidate shortcuts). Greedy params give a one-hot
    vector at the argmax; a row where every token was filtered out gives the unfiltered
    argmax, as the engine does. With `stages`, also each stage's probabilities in order
    (``[("input", p0), (stage, p1), ...]``) for the stages that act on this row.
    """
    final, recorded, is_greedy = stage_logits(
        logits,
        params,
        history=history,
        prompt=prompt,
        order=order,
        eos_token_ids=eos_token_ids,
        tokenizer=tokenizer,
        state=state,
    )
    probs = _one_hot(final) if is_greedy else _softmax(final)
    if not stages:
        return probs
    return probs, [(name, _softmax(x)) for name, x in recorded]


def stage_logits(
    logits: Any,
    params: SamplingParams,
    *,
    history: Sequence[int] = (),
    prompt: Sequence[int] = (),
    order: str | Sequence | None = None,
    eos_token_ids: Sequence[int] = (),
    tokenizer: Any = None,
    state: SamplerState | None = None,
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]], bool]:
    """What `distribution` computes, as logits: the final row ``[V]`` (float64), each
    acting stage's output (``[("input", x0), (stage, x1), ...]``) and whether the token is
    the argmax (greedy params, or every token filtered out: then the final row is the raw
    one). A token a stage removed is -inf from that stage on.
    """
    row = (
        mx.array(np.asarray(logits, dtype=np.float32))
        if not isinstance(logits, mx.array)
        else logits
    )
    row = row.astype(mx.float32).reshape(1, -1)
    vocab_size = row.shape[-1]
    order = check_order(params.order or order or DEFAULT_ORDER)
    check_params(params, order=order, vocab_size=vocab_size, tokenizer=tokenizer)
    state = state or SamplerState(list(prompt), list(history), tokenizer=tokenizer)
    batch = SamplingBatch(
        (params,),
        (params.seed or 0,),
        (len(state.output),),
        (state,),
        tuple(eos_token_ids),
        num_candidates=vocab_size,
    )
    pipeline = [(n, s) for n, s in resolve(order) if s.is_active(params)]
    if not (bool(np.isfinite(np.array(row)).all())):
        row = clean(row)
    recorded: list = [("input", row)]
    final = np.array(apply(row, batch, pipeline, recorded)[0], dtype=np.float64)
    is_greedy = params.is_greedy
    if not np.isfinite(final).any():
        final = np.array(row[0], dtype=np.float64)  # every token filtered: the raw argmax
        is_greedy = True
    return final, [(name, np.array(x[0], dtype=np.float64)) for name, x in recorded], is_greedy


def _softmax(x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).any():
        return np.zeros_like(x)
    e = np.exp(x - x.max())
    return e / e.sum()


def _one_hot(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    out[int(np.argmax(np.nan_to_num(x, nan=-np.inf)))] = 1.0
    return out
