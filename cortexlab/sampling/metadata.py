"""Per-token metadata, computed only for rows that ask (all lazy until the step's sync).

* ``token_details``: for ``SamplingParams(logprobs=k)``: the chosen token's log-probability
  and rank under the *final* distribution (the one it was drawn from: after every stage,
  temperature included; greedy rows: softmax of the processed logits), its log-probability
  under the raw model logits, and the k most likely alternatives.
* ``stage_summaries``: for the ``sampler.distribution`` hook: per stage, how many tokens it
  kept and its top candidates with their probabilities; the final entropy and the drawn
  token's rank.

Both reuse what the stages already computed (row max, weights, log-normaliser) through
the batch's facts, so asking costs one or two passes over the vocabulary, not a softmax
per quantity.
"""

from __future__ import annotations

from cortexlab.sampling.base import SamplingBatch, exp
from cortexlab.sampling.facts import entropy, log_normaliser, top_candidates

import mlx.core as mx

NUM_HOOK_CANDIDATES = 8  # candidates per stage reported to the sampler.distribution hook


def token_details(
    batch: SamplingBatch, final: mx.array, raw: mx.array, tokens: mx.array, k: int
) -> dict:
    """Lazy arrays: logprob, rank, raw_logprob ``[b]``; top_ids / top_logprobs ``[b, k]``."""
    is_raw = raw is final  # no stage acted: one normaliser serves both
    final = final if final.dtype == mx.float32 else final.astype(mx.float32)
    chosen = tokens.reshape(-1, 1)
    lse = log_normaliser(batch, final, check=False)
    raw_lse = lse if is_raw else log_normaliser(batch, raw.astype(mx.float32), check=False)
    value = mx.take_along_axis(final, chosen, axis=-1)
    out = {
        "logprob": (value - lse).reshape(-1),
        "rank": ((final > value).sum(axis=-1) + 1).reshape(-1),
        "raw_logprob": (mx.take_along_axis(raw, chosen, axis=-1) - raw_lse).reshape(-1),
    }
    if k > 0:
        ids, values = top_candidates(final, k)
        out["top_ids"], out["top_logprobs"] = ids, values - lse
    return out


def stage_summaries(
    batch: SamplingBatch, recorded: list[tuple[str, mx.array]], tokens: mx.array
) -> dict:
    """Lazy arrays per recorded stage output: kept counts, top candidates, probabilities;
    plus the entropy (nats) of the last one and the drawn `tokens`' rank under it."""
    out: dict = {"stages": []}
    for name, x in recorded:
        x = x if x.dtype == mx.float32 else x.astype(mx.float32)
        ids, values = top_candidates(x, NUM_HOOK_CANDIDATES)
        probs = exp(values - log_normaliser(batch, x, check=False))
        out["stages"].append((name, (x > -mx.inf).sum(axis=-1), ids, probs))
    last = recorded[-1][1]
    last = last if last.dtype == mx.float32 else last.astype(mx.float32)
    out["entropy"] = entropy(batch, last).reshape(-1)
    value = mx.take_along_axis(last, tokens.reshape(-1, 1), axis=-1)
    out["rank"] = ((last > value).sum(axis=-1) + 1).reshape(-1)
    return out
