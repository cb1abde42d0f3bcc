"""Per-token metadata, computed only for rows that ask (all lazy until the step's sync).

* ``token_details``: for ``SamplingParams(logprobs=k)``: the chosen token's log-probability
  and rank under the *final* distribution (the one it was drawn from: after every stage,
  temperature included; greedy rows: softmax of the processed logits), its log-probability
  under the raw model logits, and the k most likely alternatives.
* ``stage_summaries``: for the ``sampler.distribution`` hook: per stage, how many tokens it
  kept and its top candidates with their probabilities; the final entropy.
"""

from __future__ import annotations

from cortexlab.sampling.base import exp

import mlx.core as mx

NUM_HOOK_CANDIDATES = 8  # candidates per stage reported to the sampler.distribution hook


def log_softmax(x: mx.array) -> mx.array:
    """``x - logsumexp(x)`` per row, float32 (one exp pass with the fast helper)."""
    x = x.astype(mx.float32)
    top = x.max(axis=-1, keepdims=True)
    return x - (top + mx.log(exp(x - top).sum(axis=-1, keepdims=True)))


def top_entries(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest entries per row, descending: ids ``[b, k]`` and values."""
    k = min(k, logprobs.shape[-1])
    if k < logprobs.shape[-1]:
        ids = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    else:
        ids = mx.broadcast_to(mx.arange(k)[None, :], logprobs.shape)
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, -1), mx.take_along_axis(values, order, -1)


def token_details(final: mx.array, raw: mx.array, tokens: mx.array, k: int) -> dict:
    """Lazy arrays: logprob, rank, raw_logprob ``[b]``; top_ids / top_logprobs ``[b, k]``."""
    chosen = tokens.reshape(-1, 1)
    final_lp, raw_lp = log_softmax(final), log_softmax(raw)
    chosen_lp = mx.take_along_axis(final_lp, chosen, axis=-1)
    out = {
        "logprob": chosen_lp.reshape(-1),
        "rank": ((final_lp > chosen_lp).sum(axis=-1) + 1).reshape(-1),
        "raw_logprob": mx.take_along_axis(raw_lp, chosen, axis=-1).reshape(-1),
    }
    if k > 0:
        out["top_ids"], out["top_logprobs"] = top_entries(final_lp, k)
    return out


def stage_summaries(recorded: list[tuple[str, mx.array]]) -> dict:
    """Lazy arrays per recorded stage output: kept counts, top candidates, probabilities;
    plus the entropy (nats) of the last one."""
    out: dict = {"stages": []}
    for name, x in recorded:
        lp = log_softmax(x)
        ids, values = top_entries(lp, NUM_HOOK_CANDIDATES)
        out["stages"].append((name, (x > -mx.inf).sum(axis=-1), ids, exp(values)))
    lp = log_softmax(recorded[-1][1])
    out["entropy"] = -(exp(lp) * mx.maximum(lp, -1e30)).sum(axis=-1)
    return out
