"""`explain`: which candidates a row's sampling chain kept, and which stage cut the others.

Built on ``distribution``'s per-stage logits: a token is *removed by* the first stage after
which it is -inf (its probability 0). Greedy rows keep only the argmax; the others are
removed by ``"greedy"`` (the selector, not a stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cortexlab.request import SamplingParams
from cortexlab.sampling.distribution import _one_hot, _softmax, stage_logits
from cortexlab.sampling.state import SamplerState

import numpy as np
import pandas as pd

GREEDY = "greedy"  # removed_by for tokens a greedy row did not pick


def explain(
    logits: Any,
    params: SamplingParams,
    *,
    top: int = 20,
    stages: bool = False,
    tokenizer: Any = None,
    history: Sequence[int] = (),
    prompt: Sequence[int] = (),
    order: str | Sequence | None = None,
    eos_token_ids: Sequence[int] = (),
    state: SamplerState | None = None,
) -> pd.DataFrame:
    """One row per candidate: raw and final probability and rank, and the stage that
    removed it (<NA> for survivors).

    Rows: the `top` most likely tokens under the raw logits plus the `top` most likely
    survivors (so every survivor when `top` or fewer survive), in raw order. Columns:
    ``token_id``, ``token`` (with a `tokenizer`), ``logit``, ``raw_prob``, ``raw_rank``,
    ``final_prob``, ``final_rank`` (<NA> once removed), ``removed_by``; with `stages`, one
    ``p_<stage>`` column per acting stage (its probabilities after that stage). ``attrs``
    hold ``num_kept`` (tokens alive after each stage, ``"input"`` first) and ``fallback``
    (every token was filtered out: the row takes the raw argmax, as the engine does) and
    ``top_p`` (for the plot's threshold line).
    Other arguments as for ``distribution``.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
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
    raw = recorded[0][1]
    is_fallback = not np.isfinite(recorded[-1][1]).any()
    raw_prob = _softmax(raw)
    final_prob = _one_hot(final) if is_greedy else _softmax(final)

    # Removed by: the first recorded output where the token is -inf ("input": it came so).
    removed_by = np.full(raw.shape, None, dtype=object)
    for name, x in recorded:
        newly = (x == -np.inf) & (removed_by == None)  # noqa: E711 (elementwise)
        removed_by[newly] = name
    removed_by[(final_prob == 0) & (removed_by == None)] = GREEDY  # noqa: E711
    removed_by[final_prob > 0] = None  # a fallback's argmax was removed, yet drawn

    top = min(top, raw.shape[-1])
    by_raw = _top(raw_prob, top)
    survivors = np.flatnonzero(final_prob > 0)
    by_final = survivors[_top(final_prob[survivors], min(top, survivors.size))]
    ids = np.union1d(by_raw, by_final)
    raw_rank = _rank(raw_prob, ids)
    ids = ids[np.lexsort((ids, raw_rank))]
    table = {
        "token_id": ids,
        **({"token": [tokenizer.decode([int(i)]) for i in ids]} if tokenizer else {}),
        "logit": raw[ids],
        "raw_prob": raw_prob[ids],
        "raw_rank": _rank(raw_prob, ids),
        "final_prob": final_prob[ids],
        "final_rank": pd.Series(_rank(final_prob, ids), dtype="Int64").where(final_prob[ids] > 0),
        "removed_by": pd.array(removed_by[ids], dtype="string"),  # <NA>: survived
    }
    if stages:
        names = _unique([name for name, _ in recorded])
        for name, (_, x) in zip(names, recorded, strict=True):
            if name != "input":
                table[f"p_{name}"] = _softmax(x)[ids]
    df = pd.DataFrame(table)
    df.attrs["num_kept"] = {
        name: int(np.isfinite(x).sum())
        for name, (_, x) in zip(_unique([n for n, _ in recorded]), recorded, strict=True)
    }
    df.attrs["fallback"] = is_fallback
    df.attrs["top_p"] = 1.0 if params.is_greedy else params.top_p
    return df


def _top(p: np.ndarray, num: int) -> np.ndarray:
    """Indices of the `num` largest entries (ties: lower id first)."""
    if num <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(p.size), -p))
    return order[:num]


def _rank(p: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """1 + the number of tokens strictly more likely than each of `ids` (as in logprobs)."""
    ordered = np.sort(p)
    return (p.size - np.searchsorted(ordered, p[ids], side="right") + 1).astype(np.int64)


def _unique(names: list[str]) -> list[str]:
    """Stage names, a repeated one numbered (``top_k``, ``top_k_2``)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
