"""The Trace: hooks that record every step and request event, read back as DataFrames."""

from __future__ import annotations

import math
from collections.abc import Mapping

from cortexlab.hooks import RequestEvent, SamplerEvent, StepEvent
from cortexlab.metrics import metrics_table, summary_row
from cortexlab.trace_blocks import BlockRecorder

import numpy as np
import pandas as pd


def request_metrics(request) -> dict:
    """Latency numbers of one request (seconds on the engine clock; NaN where undefined)."""
    nan = float("nan")
    arrival, first_token, finish = (
        request.arrival_time,
        request.first_token_time,
        request.finish_time,
    )
    times = request.token_times
    n = len(times)
    return {
        "queue_delay": (request.first_scheduled_time - arrival)
        if request.first_scheduled_time is not None
        else nan,
        "ttft": first_token - arrival if first_token is not None else nan,
        # Time per output token after the first: the decode rate a user sees.
        "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else nan,
        "e2e": finish - arrival if finish is not None else nan,
    }


def request_row(request) -> dict:
    """A request's reported values now (a plain dict: keeps no reference to the request)."""
    return {
        "request_id": request.request_id,
        "state": request.state.value,
        "finish_reason": request.finish_reason.value if request.finish_reason else None,
        "num_prompt_tokens": request.num_prompt_tokens,
        "num_output_tokens": request.num_output_tokens,
        "num_preemptions": request.num_preemptions,
        "tenant": request.params.tenant,
        "priority": request.params.priority,
        "arrival_time": request.arrival_time,
        "first_scheduled_time": request.first_scheduled_time,
        "first_token_time": request.first_token_time,
        "finish_time": request.finish_time,
        **request_metrics(request),
        "error": request.error,
    }


# The engine step at which each request event happened, as a requests-table column.
_STEP_COLUMNS = {
    "request.arrived": "arrival_step",
    "request.scheduled": "first_scheduled_step",
    "request.first_token": "first_token_step",
    "request.finished": "finish_step",
}


_TOKEN_COLUMNS = ["step", "request_id", "position", "token_id", "text", "prob", "logprob"]
_TOKEN_COLUMNS += ["entropy", "rank", "fallback"]


class Trace:
    """Records engine events; `.steps` and `.requests` give them as DataFrames.

    With ``tokens=True`` it also listens at ``sampler.distribution`` and `.tokens` gives one
    row per sampled token (probability, entropy, rank, tokens kept per stage). That hook
    makes the sampler compute per-stage summaries every step, so it is off by default.
    With ``blocks=True`` it listens at ``kv.blocks``: `.blocks` and `block_map` show which
    request held which KV block after each step (the engine then snapshots every block table
    each step, so it is off by default too).
    It keeps the values it reports, never the `Request` objects, so a finished request is
    freed once the engine lets go of it.
    """

    def __init__(self, *, tokens: bool = False, blocks: bool = False) -> None:
        for name, value in (("tokens", tokens), ("blocks", blocks)):
            if not isinstance(value, bool):
                raise ValueError(f"Trace({name}=...) must be a bool, got {value!r}")
        self.records_tokens = tokens
        self.records_blocks = blocks
        self._blocks = BlockRecorder() if blocks else None
        self._steps: dict[int, dict] = {}
        self._requests: dict = {}
        self._token_times: dict = {}
        self._output_token_ids: dict = {}
        self._tokens: list[dict] = []
        self._num_tokens: dict = {}
        self.events: list = []

    @property
    def hooks(self) -> dict:
        """The hook mapping to pass to `engine.hooks(...)` or `engine.add_hook`."""
        hooks = {"step.*": self._on_step, "request.*": self._on_request}
        if self.records_tokens:
            hooks["sampler.distribution"] = self._on_sampler
        if self._blocks is not None:
            hooks["kv.blocks"] = self._blocks.on_blocks
        return hooks

    def _on_step(self, event: StepEvent) -> None:
        row = self._steps.setdefault(event.step, {"step": event.step})
        if event.name == "step.begin":
            row["start"] = event.time
        elif event.name == "step.end":
            row["end"] = event.time
        row.update(event.data)

    def _on_request(self, event: RequestEvent) -> None:
        request = event.request
        rid = request.request_id
        self.events.append((event.time, event.step, event.name, rid))
        steps = {k: v for k, v in self._requests.get(rid, {}).items() if k.endswith("_step")}
        column = _STEP_COLUMNS.get(event.name)
        if column is not None:
            steps.setdefault(column, event.step)
        self._requests[rid] = request_row(request) | steps
        if event.name == "request.finished":
            self._token_times[rid] = tuple(request.token_times)
            self._output_token_ids[rid] = tuple(request.output_token_ids)

    def _on_sampler(self, event: SamplerEvent) -> None:
        for row in event.rows:
            rid = row["request_id"]
            position = self._num_tokens.get(rid, 0)
            self._num_tokens[rid] = position + 1
            stages = row["stages"]
            logprob = row["logprob"]
            self._tokens.append(
                {
                    "step": event.step,
                    "request_id": rid,
                    "position": position,
                    "token_id": row["token"],
                    "text": row.get("text"),
                    "prob": math.exp(logprob) if logprob is not None else np.nan,
                    "logprob": logprob if logprob is not None else np.nan,
                    "entropy": row["entropy"],
                    "rank": row.get("rank"),
                    "fallback": row["fallback"],
                    **{f"kept_{s['stage']}": s["num_kept"] for s in stages},
                    "top_ids": stages[-1]["top_ids"] if stages else [],
                    "top_probs": stages[-1]["top_probs"] if stages else [],
                }
            )

    @property
    def steps(self) -> pd.DataFrame:
        """One row per engine step: batch composition, tokens, KV usage, measured duration."""
        return pd.DataFrame(list(self._steps.values()))

    @property
    def requests(self) -> pd.DataFrame:
        """One row per request: lengths, timestamps, latencies, outcome (as last seen)."""
        df = pd.DataFrame(list(self._requests.values()))
        for column in _STEP_COLUMNS.values():
            if not df.empty and column not in df:
                df[column] = float("nan")
        return df

    @property
    def tokens(self) -> pd.DataFrame:
        """One row per sampled token (``Trace(tokens=True)`` only): step, request_id,
        position in the output, token_id, text, prob / logprob / rank under the final
        distribution, entropy (nats), fallback, ``kept_<stage>`` (tokens left after each
        stage that acted, ``kept_input`` first) and the final top candidates (top_ids,
        top_probs)."""
        if not self.records_tokens:
            raise ValueError(
                "this Trace does not record tokens: use cl.Trace(tokens=True) (it listens at "
                "sampler.distribution, which costs the sampler extra work every step)"
            )
        df = pd.DataFrame(self._tokens)
        kept = [c for c in df.columns if c.startswith("kept_")]
        df = df.reindex(columns=[*_TOKEN_COLUMNS, *kept, "top_ids", "top_probs"])
        return df.astype({c: "Int64" for c in ["rank", *kept]})

    def _block_recorder(self) -> BlockRecorder:
        if self._blocks is None:
            raise ValueError(
                "this Trace does not record KV blocks: use cl.Trace(blocks=True) (it listens at "
                "kv.blocks, which makes the engine snapshot every block table each step)"
            )
        return self._blocks

    @property
    def blocks(self) -> pd.DataFrame:
        """One row per held block per block-table entry after each step (``Trace(blocks=True)``
        only): step, block_id, request_id, index (position in that table), num_tokens (that
        request's tokens in the block), ref_count (tables holding the block), state ("held",
        or "shared" when ref_count > 1); plus a row per cached unreferenced block (state
        "cached", request_id None, ref_count 0, num_tokens <NA>, index its LRU position).
        ``.attrs`` has num_blocks, block_size, allocator and last_step."""
        return self._block_recorder().frame()

    def blocks_at(self, step: int | None = None) -> pd.DataFrame:
        """The `.blocks` rows of one step (default the last recorded), with the same attrs."""
        recorder = self._block_recorder()
        return recorder.frame([recorder.snapshot(step).step])

    def block_map(self, step: int | None = None) -> np.ndarray:
        """Per KV block after `step` (default the last): its owner's code, an index into
        `block_owner_ids`, or -1 free, -2 cached, -3 shared (``Trace(blocks=True)`` only)."""
        return self._block_recorder().block_map(step)

    @property
    def block_owner_ids(self) -> tuple:
        """Request ids by `block_map` owner code, in the order they first held a block."""
        return self._block_recorder().owner_ids

    @property
    def token_times(self) -> dict:
        """Per finished request id: the engine-clock time of each output token."""
        return dict(self._token_times)

    @property
    def output_token_ids(self) -> dict:
        """Per finished request id: its generated token ids (to check that two policies
        produced the same outputs)."""
        return dict(self._output_token_ids)

    def metrics(self, slo: Mapping[str, float] | None = None) -> pd.DataFrame:
        """One row per statistic (mean, p50, p90, p99): latencies in seconds and in steps,
        throughput, goodput under `slo` (e.g. ``{"ttft": 1.0, "tpot": 0.1}``), preemptions,
        per-tenant service. Definitions: `cortexlab.metrics`."""
        return metrics_table(self.requests, self.steps, self._token_times, slo=slo)

    def summary(self, slo: Mapping[str, float] | None = None) -> dict[str, float]:
        """`metrics()` flattened to one dict (`ttft_p50`, `throughput_rps`, ...)."""
        return summary_row(self.requests, self.steps, self._token_times, slo=slo)

    @property
    def request_events(self) -> pd.DataFrame:
        """Every request event in order: time, step, event name, request id."""
        return pd.DataFrame(self.events, columns=["time", "step", "event", "request_id"])
