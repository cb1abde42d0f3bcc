"""The engine's sampler: checks params at submit, samples a step, keeps per-request state.

The engine calls ``sample`` after the forward (lazy), evaluates ``Sampled.arrays`` with the
step's other arrays in its one ``mx.eval``, then ``commit``: tokens come back, stage
state is updated (mirostat's mu), logprobs and fallbacks are recorded on the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cortexlab.sampling.base import NUM_CANDIDATES, SamplingBatch
from cortexlab.sampling.chain import Outcome, Sampled, run
from cortexlab.sampling.order import DEFAULT_ORDER, check_order, check_params
from cortexlab.sampling.state import SamplerState

import mlx.core as mx

# A fallback row's summary: nothing was drawn from a distribution.
_NO_SUMMARY = {"entropy": float("nan"), "rank": None, "stages": []}


def _own_stages(outcome: Outcome, params) -> dict:
    """The row's summary with only the stages that act on its own params: rows of one group
    run the union of their stages, and an inactive stage passes a row through unchanged,
    so a request's record must not depend on what else was in the batch."""
    summary = outcome.summary
    recorded = summary["stages"]  # "input", then one per stage of the group, in order
    acting = [s.is_active(params) for _, s in outcome.stages]
    stages = recorded[:1] + [r for r, on in zip(recorded[1:], acting, strict=True) if on]
    return {**summary, "stages": stages}


class Sampler:
    """Sampling for one engine: its default `order`, its model's vocabulary and tokenizer."""

    def __init__(
        self, order: str | Sequence = DEFAULT_ORDER, *, vocab_size: int, tokenizer: Any = None
    ) -> None:
        try:
            self.order = check_order(order)
        except ValueError as exc:
            raise ValueError(f"sampling_order: {exc}") from None
        self.vocab_size, self.tokenizer = vocab_size, tokenizer
        self.eos_token_ids = tuple(sorted(getattr(tokenizer, "eos_token_ids", None) or ()))
        self.num_candidates = NUM_CANDIDATES

    def check(self, params) -> None:
        """ValueError if `params` cannot run on this engine (see ``order.check_params``)."""
        order = params.order if params.order is not None else self.order
        check_params(params, order=order, vocab_size=self.vocab_size, tokenizer=self.tokenizer)

    def state(self, request) -> SamplerState:
        """The request's sampler state (created on first use, kept on the request)."""
        if request.sampling_state is None:
            request.sampling_state = SamplerState(
                request.prompt_token_ids, request.output_token_ids, tokenizer=self.tokenizer
            )
        return request.sampling_state

    def sample(self, logits: mx.array, requests: Sequence, *, record: bool = False) -> Sampled:
        """Lazy tokens for one row of `logits` per request (nothing evaluated)."""
        batch = SamplingBatch(
            tuple(r.params for r in requests),
            tuple(r.seed for r in requests),
            tuple(r.num_output_tokens for r in requests),
            tuple(self.state(r) for r in requests),
            self.eos_token_ids,
            self.num_candidates,
        )
        return run(logits, batch, order=self.order, record=record)

    def commit(self, sampled: Sampled, requests: Sequence) -> tuple[list[int], list[dict]]:
        """After the sync: the tokens, and the ``sampler.distribution`` rows if recorded."""
        tokens, rows = [], []
        for request, outcome in zip(requests, sampled.resolve(), strict=True):
            state, params = request.sampling_state, request.params
            tokens.append(outcome.token)
            if outcome.is_fallback:
                state.fallback_steps.append(request.num_output_tokens)
            if outcome.logprob is not None:
                for _, stage in outcome.stages:
                    if hasattr(stage, "observe") and stage.is_active(params):
                        stage.observe(state, params, outcome.token, outcome.logprob)
            if outcome.details is not None:
                state.logprobs.append(
                    {"token_id": outcome.token, **outcome.details, "fallback": outcome.is_fallback}
                )
            if sampled.options["record"]:
                rows.append(
                    {
                        "request_id": request.request_id,
                        "token": outcome.token,
                        "text": self._spell(outcome.token)[0],
                        "logprob": outcome.logprob,
                        "fallback": outcome.is_fallback,
                        **(_own_stages(outcome, params) if outcome.summary else _NO_SUMMARY),
                    }
                )
        return tokens, rows

    def logprobs(self, request) -> list[dict] | None:
        """OpenAI-shaped per-token logprobs of a request (None unless it asked for them)."""
        if request.params.logprobs is None:
            return None
        state = request.sampling_state
        return [self._entry(e) for e in (state.logprobs if state else [])]

    def _entry(self, entry: dict) -> dict:
        text, raw = self._spell(entry["token_id"])
        return {
            "token": text,
            "token_id": entry["token_id"],
            "logprob": entry["logprob"],
            "bytes": list(raw),
            "rank": entry["rank"],
            "raw_logprob": entry["raw_logprob"],
            "fallback": entry["fallback"],
            "top_logprobs": [
                {
                    "token": (s := self._spell(t))[0],
                    "token_id": t,
                    "logprob": lp,
                    "bytes": list(s[1]),
                }
                for t, lp in entry["top"]
            ],
        }

    def _spell(self, token_id: int) -> tuple[str, bytes]:
        if self.tokenizer is None:
            return str(token_id), str(token_id).encode()
        token_bytes = getattr(self.tokenizer, "token_bytes", None)
        text = self.tokenizer.decode([token_id])
        return text, token_bytes(token_id) if callable(token_bytes) else text.encode("utf-8")
