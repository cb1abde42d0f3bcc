"""Mirostat v2: keep tokens whose surprise ``-log2 p`` is at most mu, then steer mu so the
observed surprise tracks the target tau: ``mu -= eta * (surprise - tau)``.

Source: Basu et al., "Mirostat: A Neural Text Decoding Algorithm that Directly Controls
Perplexity" (ICLR 2021); llama.cpp ``mirostat_v2`` (mu starts at 2·tau; the surprise is
that of the chosen token under the final, renormalised distribution). mu lives in the
request's sampler state, so it carries across steps and survives preemption.
"""

from __future__ import annotations

import math

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import SamplingBatch, mask, register
from cortexlab.sampling.facts import derive, log_normaliser, row_max
from cortexlab.sampling.state import SamplerState

import mlx.core as mx

_LN2 = math.log(2.0)


def mu(state: SamplerState, params: SamplingParams) -> float:
    """The row's current mu (2·tau before the first token)."""
    return state.stage_state.get("mirostat", 2.0 * params.mirostat_tau)


@register("mirostat")
class Mirostat:
    """Processor: mask tokens with surprise above mu (the top token always stays)."""

    def is_active(self, params: SamplingParams) -> bool:
        """Random rows with mirostat_tau > 0."""
        return not params.is_greedy and params.mirostat_tau > 0.0

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """Masked logits ``[b, V]``."""
        limits = [
            -mu(s, p) * _LN2 if self.is_active(p) else -math.inf
            for p, s in zip(batch.params, batch.states, strict=True)
        ]
        # -log2 p <= mu  <=>  logit >= logsumexp - mu·ln 2.
        log_limit = mx.array(limits, dtype=mx.float32)[:, None]
        threshold = mx.minimum(log_normaliser(batch, logits) + log_limit, row_max(batch, logits))
        return derive(batch, logits, mask(logits, logits < threshold), threshold=threshold)

    def observe(
        self, state: SamplerState, params: SamplingParams, token: int, logprob: float
    ) -> None:
        """After a token was drawn with log-probability `logprob`: update mu."""
        surprise = -logprob / _LN2
        state.stage_state["mirostat"] = mu(state, params) - params.mirostat_eta * (
            surprise - params.mirostat_tau
        )
