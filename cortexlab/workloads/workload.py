"""`Workload`: a fixed, seeded list of requests (arrival time, lengths, tenant, priority).

A workload is model-independent until :meth:`Workload.materialize` binds it to a model's
tokenizer: then each request gets its prompt token ids and the `SamplingParams` that make it
generate exactly `output_len` tokens, so every policy run on it does the same work.
"""

from __future__ import annotations

import dataclasses
import html
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from cortexlab.request import MAX_SEED, SamplingParams
from cortexlab.workloads.distributions import check_float
from cortexlab.workloads.prompts import encoded_corpus

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from cortexlab.models.base import Model

# Independent random streams per aspect, so e.g. changing tenant weights keeps arrivals.
STREAM_ARRIVALS, STREAM_PROMPT_LEN, STREAM_OUTPUT_LEN = 0, 1, 2
STREAM_TENANT, STREAM_PRIORITY, STREAM_TEXT, STREAM_SEED = 3, 4, 5, 6
NUM_PREVIEW_ROWS = 8


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload.

    `prompt_len` counts every prompt token, the shared system prompt included; it is None
    only for a replayed text prompt, whose length depends on the tokenizer.
    """

    index: int
    arrival_time: float
    prompt_len: int | None
    output_len: int
    tenant: str = "default"
    priority: int = 0
    prompt: str | tuple[int, ...] | None = None


class MaterializedRequest(NamedTuple):
    """A request bound to a model: what `Engine.submit` needs, plus when it arrives."""

    arrival_time: float
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_text: str | None


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request `index`: fixed by the workload seed, distinct per request."""
    state = np.random.SeedSequence([seed, STREAM_SEED, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) % MAX_SEED


class Workload:
    """Requests sorted by arrival time; shows as a table in a notebook."""

    def __init__(
        self,
        requests: Sequence[WorkloadRequest],
        *,
        name: str,
        seed: int = 0,
        system_prompt_len: int = 0,
        arrivals: Any = None,
    ) -> None:
        """Sort `requests` by arrival (stable) and number them 0..n-1 in that order."""
        if not requests:
            raise ValueError("Workload: requests must hold at least one WorkloadRequest")
        for r in requests:
            if r.prompt is None and (r.prompt_len or 0) <= system_prompt_len:
                raise ValueError(
                    f"Workload: request {r.index} needs prompt text or a prompt_len > "
                    f"system_prompt_len ({system_prompt_len}), got {r.prompt_len!r}"
                )
        ordered = sorted(requests, key=lambda r: r.arrival_time)
        self.requests: tuple[WorkloadRequest, ...] = tuple(
            dataclasses.replace(r, index=i) for i, r in enumerate(ordered)
        )
        self.name = name
        self.seed = seed
        self.system_prompt_len = system_prompt_len
        self.arrivals = arrivals  # the arrival process that drew the times; None for a replay

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[WorkloadRequest]:
        return iter(self.requests)

    def __getitem__(self, index: int) -> WorkloadRequest:
        return self.requests[index]

    @property
    def duration(self) -> float:
        """Seconds from the first arrival to the last."""
        return self.requests[-1].arrival_time - self.requests[0].arrival_time

    @property
    def rate(self) -> float:
        """Observed arrival rate, requests per second (inf when all arrive together)."""
        return (len(self) - 1) / self.duration if self.duration > 0 else float("inf")

    def to_frame(self) -> pd.DataFrame:
        """One row per request; `replay(frame)` reads it back (without the system prompt)."""
        rows = [dataclasses.asdict(r) for r in self.requests]
        frame = pd.DataFrame(rows, columns=[f.name for f in dataclasses.fields(WorkloadRequest)])
        if frame["prompt_len"].isna().any():
            frame["prompt_len"] = frame["prompt_len"].astype("Int64")
        if frame["prompt"].isna().all():
            return frame.drop(columns="prompt")
        # Lists, not tuples: to_csv then writes "[1, 2, 3]", which replay reads as token ids.
        frame["prompt"] = [list(p) if isinstance(p, tuple) else p for p in frame["prompt"]]
        return frame

    def summary(self) -> dict:
        """Counts, rate and length statistics as a flat dict."""
        frame = self.to_frame()
        out: dict = {
            "name": self.name,
            "num_requests": len(self),
            "duration_s": round(self.duration, 3),
            "rate_per_s": round(self.rate, 3),
            "seed": self.seed,
            "system_prompt_len": self.system_prompt_len,
        }
        for column in ("prompt_len", "output_len"):
            values = frame[column].dropna().to_numpy(dtype=np.float64)
            if len(values):
                out[f"{column}_mean"] = round(float(values.mean()), 1)
                for q in (50, 90, 99):
                    out[f"{column}_p{q}"] = round(float(np.percentile(values, q)), 1)
                out[f"{column}_max"] = int(values.max())
        out["total_output_tokens"] = int(frame["output_len"].sum())
        out["tenants"] = dict(sorted(Counter(r.tenant for r in self.requests).items()))
        out["priorities"] = dict(sorted(Counter(r.priority for r in self.requests).items()))
        return out

    def with_rate(self, rate: float) -> Workload:
        """The same requests with arrival times rescaled to `rate` requests per second.

        For a generated workload this equals drawing it again at the new rate with the same
        seed (exponential and gamma gaps scale with 1 / rate); lengths and prompts are kept.
        """
        rate = check_float(
            "Workload.with_rate", "rate", rate, "a finite float > 0", lambda v: v > 0
        )
        current = getattr(self.arrivals, "rate", None) or self.rate
        if self.duration == 0 or current == float("inf"):
            raise ValueError(
                "Workload.with_rate: every request arrives at once; there is no rate to change"
            )
        factor = current / rate
        start = self.requests[0].arrival_time
        requests = [
            dataclasses.replace(r, arrival_time=start + (r.arrival_time - start) * factor)
            for r in self.requests
        ]
        arrivals = self.arrivals
        if dataclasses.is_dataclass(arrivals) and hasattr(arrivals, "rate"):
            arrivals = dataclasses.replace(arrivals, rate=rate)
        name = repr(arrivals) if arrivals is not None else f"{self.name} at {rate:g}/s"
        return Workload(
            requests,
            name=name,
            seed=self.seed,
            system_prompt_len=self.system_prompt_len,
            arrivals=arrivals,
        )

    def materialize(
        self, model: Model, *, params: SamplingParams | None = None
    ) -> list[MaterializedRequest]:
        """Bind every request to `model`: prompt token ids, text and per-request params.

        Params start from `params` (default `SamplingParams()`, greedy) and are overridden with
        max_tokens = output_len, ignore_eos = True and no stop strings, so each request
        generates exactly output_len tokens; plus its tenant, priority and a seed derived from
        the workload seed and the request's index. Generated prompts are corpus text starting
        at a seeded word; requests get distinct starting words while the corpus has enough.
        """
        return list(self.iter_materialize(model, params=params))

    def iter_materialize(
        self, model: Model, *, params: SamplingParams | None = None
    ) -> Iterator[MaterializedRequest]:
        """`materialize`, one request at a time (the same requests, in order): a large
        workload's prompts then need not all exist at once. Lengths and `params` are
        checked here, before the first request; a replayed prompt's text when reached."""
        base = SamplingParams() if params is None else params
        if not isinstance(base, SamplingParams):
            raise ValueError(f"materialize: params must be a SamplingParams or None, got {base!r}")
        for r in self.requests:
            if r.prompt_len is not None:
                _check_fits(r, r.prompt_len, model)
        tokenizer = model.tokenizer
        needs_text = [r for r in self.requests if r.prompt is None]
        corpus = encoded_corpus(tokenizer) if needs_text else None
        starts: dict[int, int] = {}
        system_ids: list[int] = []
        if corpus is not None:
            rng = np.random.default_rng([self.seed, STREAM_TEXT])
            pool = corpus.word_starts
            picks = rng.choice(len(pool), size=len(needs_text), replace=len(needs_text) > len(pool))
            starts = {r.index: int(pool[p]) for r, p in zip(needs_text, picks, strict=True)}
            # The shared system prompt: the corpus's opening passage, the same for every request.
            system_ids = (
                corpus.cut(tokenizer, 0, self.system_prompt_len) if self.system_prompt_len else []
            )
        return self._bind(model, base, corpus, starts, system_ids)

    def _bind(
        self, model: Model, base: SamplingParams, corpus: Any, starts: dict, system_ids: list
    ) -> Iterator[MaterializedRequest]:
        tokenizer = model.tokenizer
        for r in self.requests:
            if isinstance(r.prompt, tuple):
                ids, text = list(r.prompt), None
                bad = [t for t in ids if t >= model.vocab_size]
                if bad:
                    raise ValueError(
                        f"request {r.index}: prompt token id {bad[0]} is outside "
                        f"{model.name}'s vocabulary [0, {model.vocab_size})"
                    )
            elif isinstance(r.prompt, str):
                ids, text = list(tokenizer.encode(r.prompt)), r.prompt
                if not ids:
                    raise ValueError(f"request {r.index}: prompt {r.prompt!r} encodes to no tokens")
                _check_fits(r, len(ids), model)
            else:
                assert corpus is not None  # a request without a prompt made needs_text non-empty
                own_len = r.prompt_len - len(system_ids)
                own = corpus.cut(tokenizer, starts[r.index], own_len, after_text=bool(system_ids))
                ids = system_ids + own
                text = tokenizer.decode(ids)
            sampling = dataclasses.replace(
                base,
                max_tokens=r.output_len,
                ignore_eos=True,
                stop=(),
                stop_token_ids=(),
                tenant=r.tenant,
                priority=r.priority,
                seed=request_seed(self.seed, r.index),
            )
            yield MaterializedRequest(r.arrival_time, ids, sampling, text)

    # -- display ------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Workload({self.name}, {len(self)} requests over {self.duration:.2f} s, seed={self.seed})"

    def _repr_html_(self) -> str:
        # Only seeded content, fixed float formats: the output must be identical run to run.
        s = self.summary()
        when = (
            f"over {s['duration_s']:.2f} s ({s['rate_per_s']:.2f}/s)"
            if self.duration > 0
            else f"all at {self.requests[0].arrival_time:g} s"
        )
        facts = [
            f"<b>Workload</b> {html.escape(self.name)}: {s['num_requests']} requests {when}, "
            f"seed {s['seed']}"
        ]
        for column in ("prompt_len", "output_len"):
            if f"{column}_mean" in s:
                facts.append(
                    f"{column}: mean {s[f'{column}_mean']:.1f}, p50 {s[f'{column}_p50']:.0f}, "
                    f"p99 {s[f'{column}_p99']:.0f}, max {s[f'{column}_max']}"
                )
        if self.system_prompt_len:
            facts.append(f"shared system prompt: {self.system_prompt_len} tokens (in prompt_len)")
        facts.append(
            "tenants: " + html.escape(", ".join(f"{k} {v}" for k, v in s["tenants"].items()))
        )
        facts.append("priorities: " + ", ".join(f"{k}: {v}" for k, v in s["priorities"].items()))
        frame = self.to_frame().head(NUM_PREVIEW_ROWS)
        if "prompt" in frame:
            frame["prompt"] = frame["prompt"].map(lambda p: _short(p))
        table = frame.to_html(index=False, float_format=lambda x: f"{x:.3f}")
        more = len(self) - NUM_PREVIEW_ROWS
        tail = f"<p>... {more} more rows (to_frame() has them all)</p>" if more > 0 else ""
        return "<br>".join(facts) + table + tail


def _check_fits(r: WorkloadRequest, prompt_len: int, model: Model) -> None:
    if prompt_len + r.output_len > model.max_context:
        raise ValueError(
            f"request {r.index}: prompt_len {prompt_len} + output_len {r.output_len} = "
            f"{prompt_len + r.output_len} exceeds {model.name}'s context of {model.max_context} tokens"
        )


def _short(prompt: object, limit: int = 40) -> str:
    text = str(prompt)
    return text if len(text) <= limit else text[: limit - 3] + "..."
