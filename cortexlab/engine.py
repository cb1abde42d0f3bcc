"""The engine: a continuous-batching step loop over a shared paged KV arena.

One `Engine.step()`: admit arrivals, let the scheduler form a batch (grow/preempt through
the allocator), run it through the model with attention reading the arena, sample one
token per finished row, append/stream/stop-check, free finished requests' blocks, and fire
the hook points along the way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cortexlab.backend import warn_if_slow
from cortexlab.hooks import HookManager, RequestEvent, StepEvent
from cortexlab.kv import allocators
from cortexlab.kv.arena import KVArena
from cortexlab.models.base import Model
from cortexlab.request import FinishReason, Request, RequestState, SamplingParams
from cortexlab.runner import RowWork, Runner
from cortexlab.sampling import sample
from cortexlab.schedulers import Batch, SchedulerConfig, SchedulerState, schedulers
from cortexlab.trace import request_metrics

import mlx.core as mx

CLOCKS = ("wall", "measured")
DEFAULT_KV_MEMORY_BYTES = 1 << 30


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

    def _repr_html_(self) -> str:
        import html

        return (
            f"<b>{html.escape(str(self.request_id))}</b> "
            f"[{self.finish_reason}, {len(self.token_ids)} tokens]: "
            f"<pre>{html.escape(self.text)}</pre>"
        )


def _token_slice(request: Request, num_new_tokens: int) -> list[int]:
    """The next `num_new_tokens` uncomputed tokens of `request` (without copying the rest)."""
    start, prompt = request.num_computed_tokens, request.prompt_token_ids
    end = start + num_new_tokens
    if start >= len(prompt):
        n = len(prompt)
        return request.output_token_ids[start - n : end - n]
    return (
        (prompt + request.output_token_ids)[start:end] if end > len(prompt) else prompt[start:end]
    )


class Clock:
    """Engine time in seconds since the engine was built.

    `wall`: real elapsed time. `measured`: advances only by each step's measured duration
    (plus explicit jumps over idle gaps), so experiments do not wait through idle time.
    """

    def __init__(self, kind: str) -> None:
        if kind not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {kind!r}")
        self.kind = kind
        self._start = time.perf_counter()
        self._measured = 0.0

    def now(self) -> float:
        """Current engine time."""
        if self.kind == "wall":
            return time.perf_counter() - self._start
        return self._measured

    def advance(self, seconds: float) -> None:
        """Add a step's measured duration (no-op for the wall clock)."""
        if self.kind == "measured":
            self._measured += seconds


class Engine:
    """Continuous batching over one KV arena with pluggable scheduler and allocator."""

    def __init__(
        self,
        model: Model,
        *,
        scheduler: str | Any = "fcfs",
        allocator: str | Any = "paged",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_memory_bytes: int = DEFAULT_KV_MEMORY_BYTES,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        clock: str = "wall",
    ) -> None:
        warn_if_slow()
        for name, value in (("block_size", block_size), ("kv_memory_bytes", kv_memory_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.model = model
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        if not isinstance(allocator, str):
            # A ready allocator brings its own num_blocks and block_size.
            self.allocator = allocator
        else:
            if num_blocks is None:
                # Enough for max_num_seqs full contexts, capped by the memory budget.
                per_block = model.kv_bytes_per_token * block_size
                wanted = -(-max_num_seqs * model.max_context // block_size)
                num_blocks = max(1, min(wanted, kv_memory_bytes // per_block))
            elif isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
                raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
            self.allocator = allocators.create(
                allocator, num_blocks=num_blocks, block_size=block_size
            )
        self.scheduler = schedulers.create(scheduler)
        self.arena = KVArena(
            num_layers=model.num_layers,
            num_blocks=self.allocator.num_blocks,
            block_size=self.allocator.block_size,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            dtype=model.dtype,
        )
        self.runner = Runner(model, self.arena)
        self.clock = Clock(clock)
        self.state = SchedulerState(
            waiting=deque(), running=[], allocator=self.allocator, config=self.config
        )
        self.hook_manager = HookManager()
        self.num_steps = 0
        self.last_batch: Batch | None = None
        self._requests: dict[str | int, Request] = {}
        self._detokenizers: dict[int, Any] = {}
        self._incoming: deque[Request] = deque()
        self._cancels: set[int] = set()
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._progress = threading.Condition()
        self._next_id = 0
        self._background: threading.Thread | None = None
        self._stop_background = threading.Event()

    # -- hooks ---------------------------------------------------------------------------
    def hooks(self, hooks: Mapping[str, Any]):
        """Context manager: `with engine.hooks({"step.end": fn}): ...` scopes callbacks."""
        return self.hook_manager.scoped(hooks)

    def add_hook(self, pattern: str, fn) -> Any:
        """Permanently add `fn` at hook points matching `pattern`; returns an undo function."""
        return self.hook_manager.add(pattern, fn)

    def _fire_request(self, name: str, request: Request) -> None:
        if self.hook_manager.is_active(name):
            self.hook_manager.fire(
                name, RequestEvent(name, self.clock.now(), self.num_steps, request)
            )

    def _fire_step(self, name: str, data: dict | None = None) -> None:
        if self.hook_manager.is_active(name):
            self.hook_manager.fire(
                name, StepEvent(name, self.clock.now(), self.num_steps, data or {})
            )

    # -- submission ----------------------------------------------------------------------
    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        request_id: str | int | None = None,
    ) -> Request:
        """Queue a prompt (text or token ids); thread-safe. Impossible requests fail at once."""
        token_ids, text = self._encode(prompt, chat)
        return self._submit(token_ids, params, text, request_id)

    def _encode(self, prompt: str | Sequence[int], chat: bool) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.model.encode_prompt(prompt, chat=chat), prompt
        return list(prompt), None

    def _submit(
        self,
        token_ids: list[int],
        params: SamplingParams | None,
        text: str | None,
        request_id: str | int | None = None,
    ) -> Request:
        with self._lock:
            if request_id is None:
                request_id = self._next_id
                self._next_id += 1
            elif request_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            request = Request(
                request_id, token_ids, params, prompt=text, arrival_time=self.clock.now()
            )
            self._requests[request_id] = request
            self._incoming.append(request)
        return request

    def _why_impossible(self, request: Request) -> str | None:
        if request.max_num_tokens > self.model.max_context:
            return (
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.params.max_tokens}) = {request.max_num_tokens} exceeds the model's "
                f"context of {self.model.max_context} tokens"
            )
        if not self.allocator.can_ever_fit(request):
            return (
                f"prompt + max_tokens = {request.max_num_tokens} tokens can never fit the KV "
                f"arena ({self.allocator.num_blocks} blocks x {self.allocator.block_size} "
                f"slots, {type(self.allocator).__name__})"
            )
        bad = [t for t in request.prompt_token_ids if t >= self.model.vocab_size]
        if bad:
            return (
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.model.vocab_size})"
            )
        return None

    def cancel(self, request: Request | str | int) -> None:
        """Cancel a request; takes effect at the next step (thread-safe)."""
        req = request if isinstance(request, Request) else self._requests[request]
        with self._lock:
            self._cancels.add(id(req))

    def _admit_arrivals(self) -> None:
        with self._lock:
            arrivals, self._incoming = list(self._incoming), deque()
            cancels, self._cancels = self._cancels, set()
        now = self.clock.now()
        for request in arrivals:
            self._fire_request("request.arrived", request)
            reason = self._why_impossible(request)
            if reason is not None:
                request.fail(reason, now)
                self._fire_request("request.finished", request)
                continue
            self._detokenizers[id(request)] = self.model.tokenizer.detokenizer()
            self.state.waiting.append(request)
        for request in [*self.state.waiting, *self.state.running]:
            if id(request) in cancels:
                self._end(request, FinishReason.CANCELLED, now)

    # -- the step ------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        """True while any request is queued, waiting or running."""
        return bool(self._incoming or self.state.waiting or self.state.running)

    def step(self) -> list[Request]:
        """Run one scheduling + forward + sampling step; returns requests that ended in it."""
        with self._step_lock:
            return self._step()

    def _step(self) -> list[Request]:
        t0 = time.perf_counter()
        self._admit_arrivals()
        self.state.now = self.clock.now()
        self._fire_step("step.begin")
        batch = self.last_batch = self.scheduler.schedule(self.state)
        for request in batch.preempted:
            self._fire_request("request.preempted", request)
        if batch.is_empty:
            self._end_step(time.perf_counter() - t0, num_generated=0, num_finished=0)
            return []
        for s in batch.scheduled:
            if s.request.num_preemptions == 0 and s.request.num_computed_tokens == 0:
                self._fire_request("request.scheduled", s.request)
        self._fire_step(
            "step.batch",
            {
                "num_seqs": batch.num_seqs,
                "num_prefill_seqs": batch.num_prefill_seqs,
                "num_decode_seqs": batch.num_decode_seqs,
                "num_prefill_tokens": batch.num_prefill_tokens,
                "num_batched_tokens": batch.num_batched_tokens,
                "num_preempted": len(batch.preempted),
                "request_ids": [s.request.request_id for s in batch.scheduled],
                "num_new_tokens": [s.num_new_tokens for s in batch.scheduled],
            },
        )
        rows = [
            RowWork(
                s.request.block_table,
                s.request.num_computed_tokens,
                _token_slice(s.request, s.num_new_tokens),
                s.needs_logits,
            )
            for s in batch.scheduled
        ]
        sampled = [s.request for s in batch.scheduled if s.needs_logits]
        logits = self.runner.forward(rows)
        tokens = sample(
            logits,
            [r.params for r in sampled],
            [r.seed for r in sampled],
            [r.num_output_tokens for r in sampled],
        )
        # The one sync of the step: tokens and every arena write together.
        mx.eval(tokens, *self.arena.arrays)
        token_list = tokens.tolist()
        duration = time.perf_counter() - t0
        self.clock.advance(duration)
        now = self.clock.now()
        for s in batch.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        ended = []
        for request, token in zip(sampled, token_list, strict=True):
            request.append_token(token, now)
            if request.num_output_tokens == 1:
                self._fire_request("request.first_token", request)
            reason = self._check_stop(request, token)
            if reason is not None:
                self._end(request, reason, now)
                ended.append(request)
        self._end_step(duration, num_generated=len(sampled), num_finished=len(ended))
        return ended

    def _end_step(self, duration: float, *, num_generated: int, num_finished: int) -> None:
        if self.hook_manager.is_active("step.end"):
            usage = self.allocator.usage()
            self._fire_step(
                "step.end",
                {
                    "duration": duration,
                    "num_generated_tokens": num_generated,
                    "num_finished": num_finished,
                    "num_waiting": len(self.state.waiting),
                    "num_running": len(self.state.running),
                    "kv_used_slots": usage.num_used_slots,
                    "kv_reserved_slots": usage.num_reserved_slots,
                    "kv_fragmented_slots": usage.num_fragmented_slots,
                    "kv_free_slots": usage.num_free_slots,
                    "kv_utilization": usage.utilization,
                },
            )
        self.num_steps += 1
        self._notify()

    def _check_stop(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        is_eos = not params.ignore_eos and token in self.model.tokenizer.eos_token_ids
        detok = self._detokenizers[id(request)]
        if is_eos or token in params.stop_token_ids:
            request.text += detok.finalize()
            return FinishReason.STOP
        before = len(request.text)
        request.text += detok.add_token(token)
        if params.stop:
            # Only the new tail can complete a stop string.
            start = max(0, before - max(len(s) for s in params.stop) + 1)
            hits = [i for s in params.stop if (i := request.text.find(s, start)) >= 0]
            if hits:
                request.text = request.text[: min(hits)]
                return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens:
            request.text += detok.finalize()
            return FinishReason.LENGTH
        return None

    def _end(self, request: Request, reason: FinishReason, now: float) -> None:
        """Move a request to its terminal state and give its blocks back."""
        if request.state is RequestState.RUNNING:
            self.state.running.remove(request)
        elif request in self.state.waiting:
            self.state.waiting.remove(request)
        self.allocator.free(request)
        request.finish(reason, now)
        self._detokenizers.pop(id(request), None)
        self._fire_request("request.finished", request)

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    # -- driving -------------------------------------------------------------------------
    def run_until_done(self, *, max_steps: int | None = None) -> None:
        """Step until every submitted request has ended (or `max_steps` steps ran)."""
        steps = 0
        while self.has_unfinished and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1

    def _wait(self, requests: Sequence[Request]) -> None:
        if self._background is None:
            while not all(r.is_finished for r in requests):
                self.step()
            return
        with self._progress:
            self._progress.wait_for(lambda: all(r.is_finished for r in requests))

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
    ) -> list[Result]:
        """Submit every prompt, run them to completion, return results in prompt order."""
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
        encoded = [self._encode(p, chat) for p in prompts]
        for i, ((ids, _), sp) in enumerate(zip(encoded, params_list, strict=True)):
            if not ids:
                raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
            if sp is not None and not isinstance(sp, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(sp).__name__}")
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
            },
        )

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
    ) -> Iterator[str]:
        """Yield text deltas as they are produced; closing the generator cancels the request."""
        request = self.submit(prompt, params, chat=chat)
        sent = 0
        try:
            while True:
                if self._background is None:
                    if not request.is_finished:
                        self.step()
                else:
                    with self._progress:
                        self._progress.wait_for(
                            lambda n=sent: request.is_finished or len(request.text) > n,
                            timeout=1.0,
                        )
                text = request.text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if request.is_finished and sent >= len(request.text):
                    return
        finally:
            if not request.is_finished:
                self.cancel(request)
                if self._background is None:
                    self.step()

    def start(self) -> None:
        """Run the step loop in a background thread (submit from anywhere meanwhile)."""
        if self._background is not None:
            return
        self._stop_background.clear()

        def loop() -> None:
            while not self._stop_background.is_set():
                if self.has_unfinished or self._cancels:
                    self.step()
                else:
                    time.sleep(0.002)

        self._background = threading.Thread(target=loop, name="cortexlab-engine", daemon=True)
        self._background.start()

    def stop(self) -> None:
        """Stop the background loop (requests in flight stay where they are)."""
        if self._background is None:
            return
        self._stop_background.set()
        self._background.join()
        self._background = None

    # -- introspection -------------------------------------------------------------------
    def get_request(self, request_id: str | int) -> Request:
        """The request submitted under `request_id`."""
        return self._requests[request_id]

    def __repr__(self) -> str:
        return (
            f"Engine(model={self.model.name!r}, scheduler={type(self.scheduler).__name__}, "
            f"allocator={type(self.allocator).__name__}, blocks={self.allocator.num_blocks}"
            f"x{self.allocator.block_size})"
        )
