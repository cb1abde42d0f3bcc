"""The shared body of policies that differ only in how they rank requests (lower runs first)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cortexlab.request import Request, RequestState
from cortexlab.schedulers.base import BaseScheduler, Batch, SchedulerState


class RankedScheduler(BaseScheduler):
    """Serve requests in `rank` order under the token budget and sequence limit.

    Non-preemptive (the default): running requests continue best-ranked first, then waiting
    ones join best-ranked first, stopping at the first that does not fit so that a large
    request is not overtaken forever. Preemptive: running and waiting requests are walked
    together in rank order, so a waiting request that outranks a running one takes the
    token budget first and, when seats or memory are short, evicts (recompute) running
    requests ranked strictly below it. Running requests a step does not reach are paused:
    they keep their blocks.

    A running request that cannot grow takes blocks from the worst-ranked running request
    not in this step's batch, possibly itself. Subclasses define `rank` and may use the
    `begin` / `end` hooks for per-step bookkeeping. Ranks are computed once per step, so
    bookkeeping that changes them belongs in `end`.
    """

    is_preemptive: bool = False

    def __init__(self) -> None:
        # Per-step scratch, rebuilt by every schedule() call.
        self._keys: dict[int, Any] = {}
        self._running_by_rank: list[Request] = []
        self._scheduled: set[int] = set()

    def rank(self, request: Request) -> Any:  # pragma: no cover - abstract
        """Sort key of `request`: lower runs first (ties: running first, then queue order)."""
        raise NotImplementedError

    def begin(self, state: SchedulerState) -> None:
        """Bookkeeping before this step's ranks are computed (new requests, cleanup)."""

    def end(self, state: SchedulerState, batch: Batch) -> None:
        """Bookkeeping once this step's batch is formed (service received, aging)."""

    def schedule(self, state: SchedulerState) -> Batch:
        """This step's batch: best-ranked first under the budget, seat and memory limits."""
        self.begin(state)
        keys = self._keys = {id(r): self.rank(r) for r in (*state.running, *state.waiting)}
        running = sorted(state.running, key=lambda r: keys[id(r)])
        if self.is_preemptive:
            order = sorted((*state.running, *state.waiting), key=lambda r: keys[id(r)])
        else:
            order = running + sorted(state.waiting, key=lambda r: keys[id(r)])
        self._running_by_rank, self._scheduled = running, set()
        batch = Batch()
        budget = state.config.max_num_batched_tokens
        is_admitting = True
        for request in order:
            if budget == 0:
                break
            if request.state is RequestState.RUNNING:
                num_preempted = len(batch.preempted)
                n = self.chunk(state, request, budget)
                if n and self.reserve(state, request, n, batch):
                    budget -= self._add(batch, request, n)
                # Memory is short: whoever ranks below would only evict more.
                is_admitting = is_admitting and len(batch.preempted) == num_preempted
            elif is_admitting and request not in batch.preempted:  # not evicted this step
                n = self.chunk(state, request, budget)
                if not n or not self._make_room(state, request, n, batch):
                    is_admitting = False
                    continue
                n = self.admit(state, request, n)
                budget -= self._add(batch, request, n)
        self.end(state, batch)
        return batch

    def _add(self, batch: Batch, request: Request, num_new_tokens: int) -> int:
        batch.add(request, num_new_tokens)
        self._scheduled.add(id(request))
        return num_new_tokens

    def _unscheduled_worst_first(self) -> Iterable[Request]:
        for r in reversed(self._running_by_rank):
            if r.state is RequestState.RUNNING and id(r) not in self._scheduled:
                yield r

    def victim(self, state: SchedulerState, request: Request, batch: Batch) -> Request:
        """The worst-ranked running request not in this step's batch (possibly `request`)."""
        return next(iter(self._unscheduled_worst_first()))

    def _make_room(self, state: SchedulerState, request: Request, n: int, batch: Batch) -> bool:
        """A seat and first blocks for waiting `request`, evicting lower ranks if preemptive."""
        limit = state.config.max_num_seqs
        while not (len(state.running) < limit and self.can_admit(state, request, n)):
            victim = next(iter(self._unscheduled_worst_first()), None)
            if (
                not self.is_preemptive
                or victim is None
                or not self._keys[id(victim)] > self._keys[id(request)]
            ):
                return False
            self.preempt(state, victim, batch)
        return True


def drop_departed(table: dict, requests: Iterable[Request]) -> None:
    """Forget entries of `table` (keyed by request id) whose request is no longer queued.

    Finished requests simply leave the scheduler's queues, so per-request bookkeeping is
    pruned here; callers pass every queued request, and the rebuild only runs once the
    table holds more entries than there are requests, keeping a long run's memory flat.
    """
    requests = list(requests)
    if len(table) > len(requests):
        kept = {r.request_id: table[r.request_id] for r in requests if r.request_id in table}
        table.clear()
        table.update(kept)
