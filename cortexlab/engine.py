"""The engine: a continuous-batching step loop over a shared paged KV arena.

One `Engine.step()`: admit arrivals, let the scheduler form a batch (grow/preempt through
the allocator), run it through the model with attention reading the arena, sample one
token per finished row, append/stream/stop-check, free finished requests' blocks, and fire
the hook points along the way.
"""

from __future__ import annotations

import heapq
import math
import numbers
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from cortexlab import sim
from cortexlab.backend import warn_if_slow
from cortexlab.clock import Clock
from cortexlab.forks import fork_ready, make_forks, unforked
from cortexlab.guard import (
    EngineError,
    PolicyError,
    ProgressWatch,
    StallError,
    StepError,
    check_arena_size,
    check_batch,
    check_block_tables,
    check_engine_options,
    check_positive_int,
    resolve_num_blocks,
    why_impossible,
)
from cortexlab.hooks import HookManager, KVEvent, RequestEvent, SamplerEvent, StepEvent
from cortexlab.kv import as_allocator
from cortexlab.kv.arena import KVArena
from cortexlab.kv.ledger import KVLedger
from cortexlab.models.base import Model
from cortexlab.request import (
    FinishReason,
    Request,
    RequestTable,
    SamplingParams,
    check_stop,
    check_token_ids,
)
from cortexlab.runner import RowWork, Runner
from cortexlab.sampling import Sampler
from cortexlab.schedulers import Batch, SchedulerConfig, SchedulerState, as_scheduler
from cortexlab.serving import Completion, Result, Serving

import mlx.core as mx

__all__ = ["Completion", "Engine", "Result", "StepError"]

DEFAULT_KV_MEMORY_BYTES = 1 << 30
DEFAULT_MAX_HISTORY = 1024


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


class Engine(Serving):
    """Continuous batching over one KV arena with pluggable scheduler and allocator.

    Failures stay local: a raising hook is removed with a warning; a policy that breaks the
    contract (checked every step unless ``check_policies=False``) or a failing forward pass
    fails the requests of that step with the error recorded on them, and their waiting
    callers raise it; a stall (nothing scheduled, nothing changing for `stall_timeout`
    seconds) fails the stuck requests. The engine stays usable after each of these.
    Finished requests are kept for `get_request` up to the last `max_history`.
    `sampling_order` is the default stage order ("hf", "llama.cpp", "mlx-lm" or a list of
    stages; see docs/sampling.md); ``SamplingParams.order`` overrides it per request.

    Every argument after `model` is keyword-only. A value outside its range raises
    ``ValueError`` naming the argument and the range; ``docs/engine.md`` has this list as a
    table.

    Args:
        model: The model to serve, from ``cl.load_model()`` (a ``cl.Model``; anything else
            raises ``TypeError``).
        scheduler: Who runs each step (default "fcfs"): a registered name
            (``cl.schedulers.available()``; an unknown name raises ``KeyError`` listing the
            known ones), a class (built with no arguments), an object with
            ``schedule(state)``, or a function ``schedule(state) -> Batch``. Its
            ``check_config(config)``, if it has one, may refuse the limits below.
            See docs/schedulers.md.
        allocator: Which blocks each request holds (default "paged"): a registered name
            (``cl.kv.available()``), a class (built with `num_blocks` and `block_size`), or
            a ready allocator object, which brings its own `num_blocks` and `block_size`
            (the three sizing arguments below are then ignored). See docs/kv.md.
        block_size: Token slots per KV block; an int in [1, 65536] (default 16).
        num_blocks: Blocks in the KV arena; None or an int >= 1 (default None: enough for
            `max_num_seqs` requests of the model's full context, capped by
            `kv_memory_bytes`). The arena must also fit MLX's 32-bit indexing
            (``(num_blocks + 1) * num_kv_heads * block_size < 2**31``) and this machine's
            memory.
        kv_memory_bytes: Cap on the arena's size when `num_blocks` is None; an int >= 1
            that holds at least one block and at most this machine's memory (default
            ``2**30``, 1 GiB). The arena's arrays start small and double as higher block
            ids come into use, so an idle engine does not hold all of it.
        max_num_seqs: Most requests running at once, so also most sequences in one step;
            an int in [1, 2**31) (default 32).
        max_num_batched_tokens: The token budget: most tokens one step processes, prompt
            chunks and decodes together; an int in [1, 2**31) (default 2048).
        enable_chunked_prefill: Whether a prompt may be split over several steps; a bool
            (default True). When False a prompt runs whole or not at all, and a prompt
            longer than `max_num_batched_tokens` fails at submit; recomputing a preempted
            request is chunked either way.
        clock: Engine time (default "wall"): "wall" (real time), "measured" (advances by
            each step's measured duration and jumps over idle gaps, for experiments) or
            "simulated" (no forward pass: each step lasts what `cost_model` says and emits
            placeholder tokens; see ``cortexlab/sim.py``).
        cost_model: With ``clock="simulated"`` only, and required there: a
            ``cl.sim.CostModel`` or the path of one saved by ``CostModel.save`` (a file
            calibrated on another model is refused).
        check_policies: Run the policy guard (``cortexlab/guard.py``) on every step's batch
            and block tables; a bool (default True). Block ids outside the arena are
            refused even when False.
        stall_timeout: Seconds of steps that schedule nothing and change nothing (and at
            least 100 such steps) before the stuck requests fail with ``cl.StallError``; a
            finite number > 0 (default 3.0).
        max_history: Ended requests kept for ``get_request``; an int >= 0 (default 1024).
        sampling_order: Default stage order for requests whose ``SamplingParams.order`` is
            None: a preset name ("hf", "llama.cpp", "mlx-lm"), or a non-empty list of stage
            names, stages or functions (default "hf"). See docs/sampling.md.
        fast_activation: For llama-family models (llama, mistral, qwen2, qwen3), compute the
            MLP's SiLU as ``x / (1 + 2**(-x log2 e))`` instead of MLX's scalar exp, and (llama,
            mistral, qwen2) attention over the KV arena in query blocks with a base-2 softmax
            (decode reads the arena blocks in place): same greedy tokens, log-probabilities
            within ~1e-4 of mlx-lm (default True; False gives mlx-lm's exact ops). Other
            models always run mlx-lm's own code.
    """

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
        cost_model: Any = None,
        check_policies: bool = True,
        stall_timeout: float = 3.0,
        max_history: int = DEFAULT_MAX_HISTORY,
        sampling_order: str | Sequence = "hf",
        fast_activation: bool = True,
    ) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be a cortexlab Model (cl.load_model()), got {model!r}")
        warn_if_slow()
        check_engine_options(
            check_policies=check_policies, stall_timeout=stall_timeout, max_history=max_history
        )
        self.model = model
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        self.clock = Clock(clock)
        cost_model = sim.check_simulation(clock, cost_model, model)
        self.scheduler = as_scheduler(scheduler)
        check_config = getattr(self.scheduler, "check_config", None)
        if callable(check_config):
            check_config(self.config)  # a policy that cannot run here says so now
        if isinstance(allocator, str | type):
            block_size = check_positive_int("block_size", block_size, high=65536)
            num_blocks = resolve_num_blocks(
                model,
                block_size=block_size,
                num_blocks=num_blocks,
                kv_memory_bytes=kv_memory_bytes,
                max_num_seqs=max_num_seqs,
            )
        # A ready allocator brings its own num_blocks and block_size.
        self.allocator = as_allocator(allocator, num_blocks=num_blocks, block_size=block_size)
        check_arena_size(
            model, num_blocks=self.allocator.num_blocks, block_size=self.allocator.block_size
        )
        # A simulated engine stores no K/V: its arena only checks block ids.
        self.arena = (KVArena if cost_model is None else sim.NullArena)(
            num_layers=model.num_layers,
            num_blocks=self.allocator.num_blocks,
            block_size=self.allocator.block_size,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            dtype=model.dtype,
        )
        self.runner = (
            Runner(model, self.arena, fast_activation=fast_activation)
            if cost_model is None
            else sim.SimulatedRunner(model, cost_model)
        )
        # The default stage order; SamplingParams.order overrides it per request.
        self.sampler = (Sampler if cost_model is None else sim.SimulatedSampler)(
            sampling_order, vocab_size=model.vocab_size, tokenizer=model.tokenizer
        )
        self.check_policies = check_policies
        self.state = SchedulerState(
            waiting=deque(), running=[], allocator=self.allocator, config=self.config
        )
        self.hook_manager = HookManager()
        self.kv = KVLedger(self.allocator, self.arena, self.hook_manager, self._fire_kv)
        # Parents of parallel samples whose forks wait for the parent's prompt (forks.py).
        self._fork_parents: dict[int, Request] = {}
        self.num_steps = 0
        self.last_batch: Batch | None = None
        self.requests = RequestTable(max_history=max_history)
        self._detokenizers: dict[int, Any] = {}
        self._incoming: deque[Request] = deque()
        # Future arrivals as a heap of (arrival_time, sequence number, request).
        self._pending: list[tuple[float, int, Request]] = []
        self._admitted: dict[int, Request] = {}  # by id(): seen by the scheduler, not ended
        self._cancels: set[int] = set()
        self._num_submitted = 0
        # A lazy source of future arrivals (`feed`): its next item, the time it was given
        # at (its requests are submitted as if then), the latest arrival it submitted.
        self._feed: Any = None
        self._feed_next: Any = None
        self._feed_since = 0.0
        self._feed_last = -math.inf
        self._watch = ProgressWatch(timeout=float(stall_timeout))
        self._lock = threading.Lock()
        # Re-entrant: a hook may submit, and submit fails impossible requests under it.
        self._step_lock = threading.RLock()
        self._progress = threading.Condition()
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

    def _fire_kv(self, name: str, request: Any, block_ids: tuple, data: dict) -> None:
        if self.hook_manager.is_active(name):
            event = KVEvent(name, self.clock.now(), self.num_steps, request, block_ids, data)
            self.hook_manager.fire(name, event)

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
        arrival_time: float | None = None,
    ) -> Request:
        """Queue a prompt (text or token ids); thread-safe.

        `arrival_time` (engine-clock seconds, default now) lets a workload's request enter
        later: until then the scheduler does not see it, and an engine with nothing else to
        do jumps to it (`measured` clock) or sleeps until it (`wall`). Bad input (token ids
        that are not ints in the vocabulary, a taken request id) raises; a request that can
        never run under this configuration comes back FAILED with the reason in `.error`.
        """
        token_ids, text = self._encode(prompt, chat)
        return self._submit(token_ids, params, text, request_id, arrival_time)

    def _encode(self, prompt: str | Sequence[int], chat: bool) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            ids = self.model.encode_prompt(prompt, chat=chat)
            return check_token_ids(ids, self.model.vocab_size), prompt
        return check_token_ids(prompt, self.model.vocab_size), None

    def _submit(
        self,
        token_ids: list[int],
        params: SamplingParams | None,
        text: str | None,
        request_id: str | int | None = None,
        arrival_time: float | None = None,
        since: float | None = None,
    ) -> Request:
        """`since`: submit as if at that engine time (a feed's), instead of now."""
        if params is not None and not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params is not None:
            self.sampler.check(params)  # token ids in the vocabulary, stages in the order
        if arrival_time is not None and (
            isinstance(arrival_time, bool)
            or not isinstance(arrival_time, numbers.Real)
            or not 0 <= arrival_time < math.inf
        ):
            raise ValueError(f"arrival_time must be a finite float >= 0, got {arrival_time!r}")
        with self._lock:
            request_id = self.requests.claim_id(request_id)
            now = self.clock.now() if since is None else since
            arrival = now if arrival_time is None else max(float(arrival_time), now)
            request = Request(request_id, token_ids, params, prompt=text, arrival_time=arrival)
            reason = why_impossible(request, self.model, self.config, self.allocator)
            for fork in make_forks(request, self.requests.claim_id):
                self.requests.add(fork)
            if reason is not None:
                request.arrival_time = now  # it fails now, so it arrives now
            self.requests.add(request)
            self._num_submitted += 1
            if reason is None and arrival > now:
                heapq.heappush(self._pending, (arrival, self._num_submitted, request))
            elif reason is None:
                self._incoming.append(request)
            if request.forks:
                self._fork_parents[id(request)] = request
        if reason is not None:
            with self._step_lock:
                self._fire_request("request.arrived", request)
                self._end(request, FinishReason.ERROR, self.clock.now(), message=reason)
            self._notify()
        return request

    def cancel(self, request: Request | str | int) -> None:
        """Cancel a request; takes effect at the next step (thread-safe; no-op once ended)."""
        if not isinstance(request, Request):
            request = self.get_request(request)
        with self._lock:
            self._cancels.update(id(r) for r in request.samples)

    def _wait_for_arrival(self) -> None:
        """With nothing to do but future arrivals: jump (measured) or sleep (wall) to the next."""
        if self._incoming or self.state.waiting or self.state.running or not self._pending:
            return
        gap = self._pending[0][0] - self.clock.now()
        if gap > 0 and self.clock.is_virtual:
            self.clock.jump(gap)
        elif gap > 0:
            # Bounded, so a background loop still notices stop() and new submissions.
            time.sleep(min(gap, 0.05))

    def _admit_arrivals(self) -> None:
        if self._feed_next is not None:
            self._pull_feed()
        self._wait_for_arrival()
        now = self.clock.now()
        with self._lock:
            arrivals, self._incoming = list(self._incoming), deque()
            while self._pending and self._pending[0][0] <= now:
                arrivals.append(heapq.heappop(self._pending)[2])
            cancels, self._cancels = self._cancels, set()
            if cancels and self._pending:
                kept = [p for p in self._pending if id(p[2]) not in cancels]
                arrivals += [p[2] for p in self._pending if id(p[2]) in cancels]
                self._pending = kept
                heapq.heapify(self._pending)
        for request in arrivals:
            self._fire_request("request.arrived", request)
            try:
                self._detokenizers[id(request)] = self.model.tokenizer.detokenizer()
            except Exception as exc:
                self._end(request, FinishReason.ERROR, now, message=f"detokenizer: {exc!r}")
                continue
            self._admitted[id(request)] = request
            self.state.waiting.append(request)
        if cancels:
            held = [f for p in self._fork_parents.values() for f in unforked(p)]
            for request in [*self.state.waiting, *self.state.running, *held]:
                if id(request) in cancels:
                    self._end(request, FinishReason.CANCELLED, now)

    # -- the step ------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        """True while any request is queued, waiting or running."""
        return bool(
            self._incoming
            or self._pending
            or self.state.waiting
            or self.state.running
            or self._feed_next is not None
        )

    def step(self) -> list[Request]:
        """Run one scheduling + forward + sampling step; returns requests that ended in it.

        Raises an EngineError (PolicyError, StallError, StepError) after failing the
        requests the error hit; everything else stays as it was and the engine goes on.
        """
        with self._step_lock:
            t0 = time.perf_counter()
            try:
                return self._step(t0)
            except EngineError:
                raise
            except Exception as exc:  # a bug outside every guarded phase: never hang on it
                error = StepError(f"step {self.num_steps} failed: {type(exc).__name__}: {exc}")
                raise self._abort(t0, self._queued(), error, exc) from exc

    def _abort(
        self, t0: float, requests: list[Request], error: EngineError, cause: BaseException | None
    ) -> EngineError:
        """Fail `requests` with `error`, close the step, and return the error to raise."""
        error.__cause__ = cause
        now = self.clock.now()
        for request in requests:
            if not request.is_finished:
                self._end(request, FinishReason.ERROR, now, error=error)
        self._end_step(self.runner.elapsed(t0), num_generated=0, num_finished=len(requests))
        return error

    def _schedule(self, t0: float) -> Batch:
        """The scheduler's batch, checked by the policy guard."""
        try:
            batch = self.scheduler.schedule(self.state)
        except Exception as exc:
            # Nobody can tell which request the policy choked on: everything it saw fails.
            error = PolicyError(self.scheduler, f"schedule() raised {type(exc).__name__}: {exc}")
            raise self._abort(t0, self._queued(), error, exc) from exc
        if self.check_policies:
            try:
                check_batch(batch, self.state, self.scheduler)
            except PolicyError as error:
                scheduled = getattr(batch, "scheduled", None) or []
                hit = [
                    r for s in scheduled if isinstance(r := getattr(s, "request", None), Request)
                ]
                raise self._abort(t0, hit or self._queued(), error, None) from None
            try:
                check_block_tables(batch, self.state, self.allocator)
            except PolicyError as error:
                hit = [s.request for s in batch.scheduled] + list(self.state.running)
                raise self._abort(t0, hit, error, None) from None
        elif batch is None:
            batch = Batch()
        return batch

    def _queued(self) -> list[Request]:
        """Every admitted request that has not ended (waiting, running or lost by a policy)."""
        return list(self._admitted.values())

    def _step(self, t0: float) -> list[Request]:
        self.last_batch = None
        self._admit_arrivals()
        self.state.now = self.clock.now()
        self.state.allocator = self.kv.view()
        self._fire_step("step.begin")
        batch = self.last_batch = self._schedule(t0)
        for request in batch.preempted:
            self._fire_request("request.preempted", request)
        if batch.is_empty:
            self._watch_progress(t0)
            self._end_step(self.runner.elapsed(t0), num_generated=0, num_finished=0)
            return []
        self._watch.reset()
        for s in batch.scheduled:
            r = s.request
            # First scheduled in this step: admitted now (a prefix-cache hit starts it with
            # computed tokens), or never run before under a policy that passes no time.
            if r.first_scheduled_time == self.state.now or (
                r.num_preemptions == 0 and r.num_computed_tokens == 0
            ):
                self._fire_request("request.scheduled", r)
        if self.hook_manager.is_active("step.batch"):
            self._fire_step("step.batch", _batch_data(batch))
        sampled = [s.request for s in batch.scheduled if s.needs_logits]
        try:
            self.kv.apply_copies()  # copy-on-write from this step's appends, before reads
            rows = [
                RowWork(
                    s.request.block_table,
                    s.request.num_computed_tokens,
                    _token_slice(s.request, s.num_new_tokens),
                    s.needs_logits,
                )
                for s in batch.scheduled
            ]
            logits = self.runner.forward(rows)
            if self._fork_parents:
                logits, sampled = self._fork(logits, sampled)
                self.kv.apply_copies()  # after the writes the forks' copies must see
            record = self.hook_manager.is_active("sampler.distribution")
            drawn = self.sampler.sample(logits, sampled, record=record)
            # The one sync of the step: tokens and every arena write together.
            mx.eval(*drawn.arrays, *self.arena.arrays)
            token_list, distributions = self.sampler.commit(drawn, sampled)
        except Exception as exc:
            error = StepError(
                f"step {self.num_steps}: the forward pass or sampler raised "
                f"{type(exc).__name__}: {exc}"
            )
            raise self._abort(t0, [s.request for s in batch.scheduled], error, exc) from exc
        duration = self.runner.elapsed(t0)  # measured, or the cost model's (simulated)
        self.clock.advance(duration)
        now = self.clock.now()
        for s in batch.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        self.kv.seal(s.request for s in batch.scheduled)
        if record and self.hook_manager.is_active("sampler.distribution"):
            event = SamplerEvent("sampler.distribution", now, self.num_steps, distributions)
            self.hook_manager.fire("sampler.distribution", event)
        ended, failure = [], None
        for request, token in zip(sampled, token_list, strict=True):
            try:
                request.append_token(token, now)
                if request.num_output_tokens == 1:
                    self._fire_request("request.first_token", request)
                reason = check_stop(
                    request,
                    token,
                    self._detokenizers[id(request)],
                    self.model.tokenizer.eos_token_ids,
                )
            except Exception as exc:  # one request's bad token text must not stop the rest
                failure = failure or StepError(f"request {request.request_id!r}: {exc!r}")
                failure.__cause__ = exc
                self._end(request, FinishReason.ERROR, now, error=failure)
                ended.append(request)
                continue
            if reason is not None:
                self._end(request, reason, now)
                ended.append(request)
        self._end_step(duration, num_generated=len(sampled), num_finished=len(ended))
        if failure is not None:
            raise failure
        return ended

    def _fork(self, logits: mx.array, sampled: list[Request]) -> tuple[mx.array, list[Request]]:
        """Fork the parallel samples whose parent computed its prompt in this step; each
        fork samples its first token from its parent's logits row (cortexlab/forks.py)."""
        rows, forked = list(range(len(sampled))), []
        now = self.clock.now()
        for i, parent in enumerate(list(sampled)):
            if self._fork_parents.pop(id(parent), None) is None:
                continue
            ready, released = fork_ready(parent, self.state, now)
            for fork in ready + released:
                self._fire_request("request.arrived", fork)
                self._detokenizers[id(fork)] = self.model.tokenizer.detokenizer()
                self._admitted[id(fork)] = fork
            for fork in ready:
                self._fire_request("request.scheduled", fork)
            self.state.waiting.extend(released)
            rows += [i] * len(ready)
            forked += ready
        if not forked:
            return logits, sampled
        return logits[mx.array(rows)], sampled + forked

    def _watch_progress(self, t0: float) -> None:
        """Fail the stuck requests when empty steps stop changing anything."""
        if not (self.state.waiting or self.state.running):
            return
        signature = (
            len(self.state.waiting),
            len(self.state.running),
            self.allocator.num_free_blocks,
            self._num_submitted,
        )
        if self._watch.is_stalled(signature):
            error = StallError(self._watch.explain(self.state, self.scheduler))
            self._watch.reset()
            raise self._abort(t0, self._queued(), error, None)

    def _end_step(self, duration: float, *, num_generated: int, num_finished: int) -> None:
        if self.hook_manager.is_active("step.end"):
            batch = self.last_batch
            data = {
                "duration": duration,
                "preempted_ids": [r.request_id for r in batch.preempted] if batch else [],
                "num_generated_tokens": num_generated,
                "num_finished": num_finished,
                "num_waiting": len(self.state.waiting),
                "waiting_ids": [r.request_id for r in self.state.waiting],
                "num_running": len(self.state.running),
            }
            try:
                data.update(self.kv.columns(self.state.waiting))
            except Exception as exc:  # a user allocator's accounting bug costs its columns only
                warnings.warn(
                    f"{type(self.allocator).__name__}.usage() raised {exc!r}", stacklevel=3
                )
            self._fire_step("step.end", data)
        if self.hook_manager.is_active("kv.blocks"):
            self._fire_step("kv.blocks", self.kv.snapshot(self.state.running))
        self.num_steps += 1
        self._notify()

    def _end(
        self,
        request: Request,
        reason: FinishReason,
        now: float,
        *,
        error: EngineError | None = None,
        message: str | None = None,
    ) -> None:
        """Move a request to its terminal state, give its blocks back, forget it."""
        if request.is_finished:
            return
        if request in self.state.running:
            self.state.running.remove(request)
        elif request in self.state.waiting:
            self.state.waiting.remove(request)
        try:
            self.state.allocator.free(request)
        except Exception as exc:
            warnings.warn(
                f"{type(self.allocator).__name__}.free() raised {exc!r} for request "
                f"{request.request_id!r}; its blocks may be lost",
                RuntimeWarning,
                stacklevel=2,
            )
        if error is not None or message is not None:
            request.fail(message or str(error), now, error)
        else:
            request.finish(reason, now)
        self._detokenizers.pop(id(request), None)
        self._admitted.pop(id(request), None)
        with self._lock:
            self.requests.retire(request)
        self._fire_request("request.finished", request)
        if self._fork_parents.pop(id(request), None) is not None:
            # Its prompt was never computed: the forks end with it, for the same reason.
            for fork in unforked(request):
                self._fire_request("request.arrived", fork)
                self._end(fork, reason, now, error=error, message=message or request.error)

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    # -- introspection -------------------------------------------------------------------
    def get_request(self, request_id: str | int) -> Request:
        """The request submitted under `request_id` (unfinished, or among the last
        `max_history` that ended)."""
        return self.requests.get(request_id)

    def __repr__(self) -> str:
        return (
            f"Engine(model={self.model.name!r}, scheduler={type(self.scheduler).__name__}, "
            f"allocator={type(self.allocator).__name__}, blocks={self.allocator.num_blocks}"
            f"x{self.allocator.block_size})"
        )


def _batch_data(batch: Batch) -> dict:
    """The `step.batch` event's numbers."""
    return {
        "num_seqs": batch.num_seqs,
        "num_prefill_seqs": batch.num_prefill_seqs,
        "num_decode_seqs": batch.num_decode_seqs,
        "num_prefill_tokens": batch.num_prefill_tokens,
        "num_batched_tokens": batch.num_batched_tokens,
        "num_preempted": len(batch.preempted),
        "request_ids": [s.request.request_id for s in batch.scheduled],
        "num_new_tokens": [s.num_new_tokens for s in batch.scheduled],
        "is_prefill": [s.request.is_prefill for s in batch.scheduled],
        "preempted_ids": [r.request_id for r in batch.preempted],
    }
