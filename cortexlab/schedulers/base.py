"""The scheduler contract: `schedule(state) -> Batch`, plus the moves every policy shares."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from cortexlab.kv.base import Allocator
from cortexlab.request import Request, RequestState


@dataclass(slots=True)
class SchedulerConfig:
    """Per-step limits every scheduler respects."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            # int32 token and row indices bound what one step can hold.
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
                raise ValueError(f"{name} must be an int in [1, 2**31), got {value!r}")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(
                f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}"
            )


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step: `num_new_tokens` after its computed ones."""

    request: Request
    num_new_tokens: int

    @property
    def needs_logits(self) -> bool:
        """True when this step computes the request's last token, so it samples the next."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass(slots=True)
class Batch:
    """What one step runs: scheduled sequences, and who was preempted to make room."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def add(self, request: Request, num_new_tokens: int) -> None:
        """Schedule `num_new_tokens` of `request` this step."""
        self.scheduled.append(ScheduledSeq(request, num_new_tokens))

    @property
    def is_empty(self) -> bool:
        """True when nothing runs this step."""
        return not self.scheduled

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return len(self.scheduled)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens the model processes this step."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decode_seqs(self) -> int:
        """Sequences generating their next token from one new token."""
        return sum(1 for s in self.scheduled if not s.request.is_prefill)

    @property
    def num_prefill_seqs(self) -> int:
        """Sequences processing prompt (or recomputed) tokens."""
        return self.num_seqs - self.num_decode_seqs

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt (or recomputed) tokens processed this step."""
        return sum(s.num_new_tokens for s in self.scheduled if s.request.is_prefill)


@dataclass(slots=True)
class SchedulerState:
    """What a scheduler sees and moves: queues, limits, the allocator, the clock."""

    waiting: deque[Request]
    running: list[Request]
    allocator: Allocator
    config: SchedulerConfig
    now: float = 0.0


@runtime_checkable
class Scheduler(Protocol):
    """A policy choosing each step's batch."""

    def schedule(self, state: SchedulerState) -> Batch:
        """Pick this step's work; admit, grow and preempt through the state."""
        ...


class FunctionScheduler:
    """A plain function `schedule(state) -> Batch` used as a scheduler."""

    def __init__(self, fn: Callable[[SchedulerState], Batch], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"a function scheduler must be callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")

    def schedule(self, state: SchedulerState) -> Batch:
        """Call the wrapped function."""
        return self.fn(state)

    def __repr__(self) -> str:
        return f"FunctionScheduler({self.name})"


class BaseScheduler:
    """Shared moves: admit a waiting request, grow a running one, preempt (recompute)."""

    name = "base"

    def schedule(self, state: SchedulerState) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_config(self, config: SchedulerConfig) -> None:
        """Raise ValueError if this policy cannot run under `config` (the engine asks once)."""

    def num_cached_tokens(self, state: SchedulerState, request: Request) -> int:
        """Leading tokens of a waiting `request` the allocator's prefix cache holds now
        (0 for allocators without one): admission computes only what comes after them."""
        if request.num_computed_tokens or request.state is RequestState.RUNNING:
            return 0
        lookup = getattr(state.allocator, "num_cached_tokens", None)
        return lookup(request) if lookup is not None else 0

    def can_admit(self, state: SchedulerState, request: Request, num_new_tokens: int) -> bool:
        """Whether `admit(state, request, num_new_tokens)` would get its blocks now."""
        total = request.num_computed_tokens + self.num_cached_tokens(state, request)
        return state.allocator.can_allocate(request, total + num_new_tokens)

    def admit(self, state: SchedulerState, request: Request, num_new_tokens: int) -> int:
        """Give a waiting request blocks for its first `num_new_tokens` (after any prefix
        the cache already holds, which counts as computed) and start it.

        Returns the tokens to schedule: `num_new_tokens`, or fewer when the cache hit
        grew since `chunk` (a preemption just cached the victim's blocks).
        """
        total = request.num_computed_tokens + self.num_cached_tokens(state, request)
        total = min(total + num_new_tokens, request.num_tokens)
        hit = state.allocator.allocate(request, total)
        # The allocator says what it really reused; a plain allocator returns None.
        request.num_computed_tokens += hit or 0
        state.waiting.remove(request)
        request.transition(RequestState.RUNNING, state.now)
        state.running.append(request)
        return min(num_new_tokens, total - request.num_computed_tokens)

    def preempt(self, state: SchedulerState, victim: Request, batch: Batch) -> None:
        """Recompute preemption: free the victim's blocks and put it first in line."""
        state.allocator.free(victim)
        victim.num_computed_tokens = 0
        victim.transition(RequestState.PREEMPTED, state.now)
        state.running.remove(victim)
        state.waiting.appendleft(victim)
        batch.preempted.append(victim)

    def victim(self, state: SchedulerState, request: Request, batch: Batch) -> Request:
        """Who gives blocks back when `request` cannot grow: the newest running request not
        already in `batch` (possibly `request` itself)."""
        # A request already in the batch must stay RUNNING for the forward pass; policies
        # that do not walk running requests oldest first would otherwise pick one.
        scheduled = {id(s.request) for s in batch.scheduled}
        return next(r for r in reversed(state.running) if id(r) not in scheduled)

    def reserve(
        self, state: SchedulerState, request: Request, num_new_tokens: int, batch: Batch
    ) -> bool:
        """Grow a running request by `num_new_tokens`, preempting others while memory is short.

        Returns False when `request` itself had to be preempted.
        """
        total = request.num_computed_tokens + num_new_tokens
        while not state.allocator.can_append(request, total):
            victim = self.victim(state, request, batch)
            self.preempt(state, victim, batch)
            if victim is request:
                return False
        state.allocator.append(request, total)
        return True

    def continue_running(
        self,
        state: SchedulerState,
        batch: Batch,
        budget: int,
        order: list[Request] | None = None,
        on_scheduled: Callable[[Request, int], None] | None = None,
    ) -> int:
        """Give running requests (oldest first, or in `order`) their next tokens within
        `budget`, preempting while memory is short; `on_scheduled(request, n)` sees each as
        it joins the batch. Returns the budget left."""
        for request in list(state.running if order is None else order):
            if budget == 0:
                break
            if request not in state.running:
                continue  # preempted earlier in this loop
            n = self.chunk(state, request, budget)
            if n and self.reserve(state, request, n, batch):
                batch.add(request, n)
                budget -= n
                if on_scheduled is not None:
                    on_scheduled(request, n)
        return budget

    def admit_in_order(
        self,
        state: SchedulerState,
        batch: Batch,
        budget: int,
        *,
        max_num_running: int | None = None,
    ) -> int:
        """Admit waiting requests in queue order until one does not fit (no overtaking);
        returns the budget left."""
        limit = state.config.max_num_seqs if max_num_running is None else max_num_running
        for request in list(state.waiting):
            if budget == 0 or len(state.running) >= limit:
                break
            n = self.chunk(state, request, budget)
            if not n or not self.can_admit(state, request, n):
                break
            n = self.admit(state, request, n)
            batch.add(request, n)
            budget -= n
        return budget

    def chunk(self, state: SchedulerState, request: Request, budget: int) -> int:
        """How many of `request`'s uncomputed tokens fit in `budget` (0: none this step);
        a waiting request's prefix-cache hit is not counted.

        With chunked prefill off a prompt runs whole or not at all; recomputing a preempted
        request's prompt + output is chunked regardless, since it may exceed any budget.
        """
        n = request.num_uncomputed_tokens - self.num_cached_tokens(state, request)
        if n <= budget:
            return n
        if state.config.enable_chunked_prefill or request.num_output_tokens > 0:
            return budget
        return 0
