"""Driving the step loop: run to completion, `generate`, `stream`, and the background thread.

`Engine` inherits these; they only call `step()` and read request state, so every failure
path (policy errors, stalls, forward errors) is the step's, and here callers just wait for
their requests to end and raise the error that ended them.
"""

from __future__ import annotations

import atexit
import math
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cortexlab.guard import EngineError
from cortexlab.request import Request, SamplingParams, check_token_ids
from cortexlab.trace import request_metrics

import mlx.core as mx


@dataclass(slots=True)
class Completion:
    """One of a request's parallel samples (``SamplingParams(n=k)``)."""

    index: int
    request_id: str | int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    error: str | None = None
    logprobs: list[dict] | None = None


@dataclass(slots=True)
class Result:
    """A finished request as the caller sees it."""

    request_id: str | int
    prompt: str | None
    text: str
    token_ids: list[int]
    finish_reason: str | None
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    # With SamplingParams(logprobs=k): one OpenAI-style entry per output token (token,
    # logprob, bytes, top_logprobs, plus token_id, rank, raw_logprob, fallback).
    logprobs: list[dict] | None = None
    # With SamplingParams(n=k): all k samples, this one first (sample i seeded seed + i).
    completions: list[Completion] = field(default_factory=list)

    def _repr_html_(self) -> str:
        import html

        return (
            f"<b>{html.escape(str(self.request_id))}</b> "
            f"[{self.finish_reason}, {len(self.token_ids)} tokens]: "
            f"<pre>{html.escape(self.text)}</pre>"
        )


# Engines with a running background loop, stopped at interpreter exit: MLX aborts the
# process ("terminate called without an active exception") when a thread that used it is
# still alive or still owns streams at teardown (ml-explore/mlx#3126).
_started: weakref.WeakSet = weakref.WeakSet()
_atexit_registered = False


def _shutdown() -> None:
    """At interpreter exit: stop every background loop, then drop the main thread's streams."""
    for engine in list(_started):
        engine.stop()
    mx.clear_streams()


class Serving:
    """The ways to drive an engine's `step()`: foreground loops and a background thread."""

    def feed(self, requests: Iterable[tuple]) -> None:
        """Submit `requests` lazily: as `submit` would submit each now, but only when the
        engine is about to need it, so they never all exist at once (a 100,000-request run).

        Each item is ``(arrival_time, prompt_token_ids, params, request_id)`` (from a
        workload: ``(r.arrival_time, r.prompt_token_ids, r.params, i)`` for each ``i, r`` of
        ``enumerate(workload.iter_materialize(model))``), in non-decreasing arrival order. Before each step the engine
        submits every item that has arrived plus the next arrival's group (so an idle engine
        jumps to it as it would with everything submitted); each keeps its own arrival time,
        so a run is identical to submitting every item now, except that a request that can
        never run fails when pulled (at that step) rather than now. One feed at a time;
        `has_unfinished` stays true until it is drained.
        """
        if self._feed_next is not None:
            raise RuntimeError("engine.feed: the previous feed is not drained yet")
        self._feed = iter(requests)
        self._feed_since = self.clock.now()
        self._feed_last = -math.inf
        self._feed_next = next(self._feed, None)
        with self._step_lock:
            self._pull_feed()

    def _pull_feed(self) -> None:
        """Submit the fed items that have arrived, then the next arrival's whole group."""
        now = self.clock.now()
        group = None
        while (item := self._feed_next) is not None:
            arrival = float(item[0])
            if arrival < self._feed_last:
                self._feed_next = None
                raise ValueError(
                    f"engine.feed: arrival times must not decrease, got {arrival} after "
                    f"{self._feed_last}"
                )
            if arrival > now:
                if group is None and self._feed_last <= now:
                    group = arrival  # nothing fed is pending: submit the next group
                if arrival != group:
                    break
            token_ids = check_token_ids(item[1], self.model.vocab_size)
            self._submit(token_ids, item[2], None, item[3], arrival, since=self._feed_since)
            self._feed_last = arrival
            self._feed_next = next(self._feed, None)

    def run_until_done(self, *, max_steps: int | None = None) -> None:
        """Step until every submitted request has ended (or `max_steps` steps ran).

        A step error fails the requests it hit and the run goes on; the first such error
        is raised at the end.
        """
        steps, first_error = 0, None
        while self.has_unfinished and (max_steps is None or steps < max_steps):
            try:
                self.step()
            except EngineError as error:
                first_error = first_error or error
            steps += 1
        if first_error is not None:
            raise first_error

    def _is_background_running(self) -> bool:
        thread = self._background
        return thread is not None and thread.is_alive()

    def _wait(self, requests: Sequence[Request]) -> None:
        """Until every request ended (stepping here unless the background loop runs); then
        raise the step error that failed one of them, if any."""
        requests = [s for r in requests for s in r.samples]
        while not all(r.is_finished for r in requests):
            if self._is_background_running():
                with self._progress:
                    self._progress.wait_for(
                        lambda: all(r.is_finished for r in requests), timeout=0.1
                    )
            else:
                try:
                    self.step()
                except EngineError:
                    pass  # recorded on the requests it failed; raised below if ours
        for r in requests:
            if r.exception is not None:
                raise r.exception

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
    ) -> list[Result]:
        """Submit every prompt, run them to completion, return results in prompt order.

        A request that can never run comes back with `error` set; if a step error (a
        broken policy, a failing forward pass) failed one of them, it is raised.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of prompts, got a single str")
        if params is None or isinstance(params, SamplingParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"params must be one SamplingParams or one per prompt ({len(prompts)}), "
                    f"got {len(params_list)}"
                )
        # Check every prompt before queueing any, so a bad one leaves nothing half-submitted.
        encoded = []
        for i, (prompt, sp) in enumerate(zip(prompts, params_list, strict=True)):
            try:
                encoded.append(self._encode(prompt, chat))
            except ValueError as exc:
                raise ValueError(f"prompts[{i}]: {exc}") from None
            if sp is not None and not isinstance(sp, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(sp).__name__}")
            if sp is not None:
                try:
                    self.sampler.check(sp)
                except ValueError as exc:
                    raise ValueError(f"params[{i}]: {exc}") from None
        requests = [
            self._submit(ids, sp, text)
            for (ids, text), sp in zip(encoded, params_list, strict=True)
        ]
        self._wait(requests)
        return [self.result(r) for r in requests]

    def result(self, request: Request) -> Result:
        """The caller's view of a request (final once it has ended)."""
        return Result(
            request_id=request.request_id,
            prompt=request.prompt,
            text=request.text,
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            error=request.error,
            metrics={
                **request_metrics(request),
                "num_prompt_tokens": request.num_prompt_tokens,
                "num_output_tokens": request.num_output_tokens,
                "num_preemptions": request.num_preemptions,
                "num_sampling_fallbacks": len(
                    getattr(request.sampling_state, "fallback_steps", ())
                ),
            },
            logprobs=self.sampler.logprobs(request),
            completions=[
                Completion(
                    index=i,
                    request_id=s.request_id,
                    text=s.text,
                    token_ids=list(s.output_token_ids),
                    finish_reason=s.finish_reason.value if s.finish_reason else None,
                    error=s.error,
                    logprobs=self.sampler.logprobs(s),
                )
                for i, s in enumerate(request.samples)
            ],
        )

    def stream(
        self,
        prompt: str | Sequence[int] | Request,
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
    ) -> Iterator[str]:
        """Yield text deltas as they are produced; closing the generator cancels the request.

        `prompt` may also be a Request already returned by `submit` (to keep a handle on it).
        """
        request = prompt if isinstance(prompt, Request) else self.submit(prompt, params, chat=chat)
        sent = 0
        try:
            while True:
                if not self._is_background_running():
                    if not request.is_finished:
                        try:
                            self.step()
                        except EngineError:
                            pass  # raised below if it failed this request
                else:
                    with self._progress:
                        self._progress.wait_for(
                            lambda n=sent: request.is_finished or len(request.text) > n,
                            timeout=0.1,
                        )
                text = request.text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if request.is_finished and sent >= len(request.text):
                    if request.exception is not None:
                        raise request.exception
                    return
        finally:
            if not request.is_finished:
                self.cancel(request)
                if not self._is_background_running():
                    try:
                        self.step()
                    except EngineError:
                        pass

    def start(self) -> None:
        """Run the step loop in a background thread (submit from anywhere meanwhile)."""
        global _atexit_registered
        if self._is_background_running():
            return
        self._stop_background.clear()
        self._background = threading.Thread(target=self._loop, name="cortexlab-engine", daemon=True)
        _started.add(self)
        if not _atexit_registered:
            atexit.register(_shutdown)
            _atexit_registered = True
        self._background.start()

    def _loop(self) -> None:
        try:
            while not self._stop_background.is_set():
                if not (self.has_unfinished or self._cancels):
                    time.sleep(0.002)
                    continue
                try:
                    self.step()
                except EngineError:
                    pass  # the failed requests carry it; their callers raise it
                except Exception as exc:  # never let the loop die silently
                    warnings.warn(f"cortexlab engine loop: {exc!r}", RuntimeWarning, stacklevel=1)
        finally:
            # MLX's maintainers' pattern: a thread that used MLX drops its streams before it
            # ends, or interpreter exit can abort (ml-explore/mlx#3126).
            mx.clear_streams()

    def stop(self) -> None:
        """Stop the background loop (requests in flight stay where they are)."""
        thread = self._background
        if thread is None:
            return
        self._stop_background.set()
        if thread is not threading.current_thread():  # a hook may call stop() from the loop
            thread.join()
        self._background = None
        _started.discard(self)
