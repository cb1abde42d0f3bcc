"""First come, first served, with a token budget, chunked prefill and recompute preemption."""

from __future__ import annotations

from cortexlab.schedulers import register
from cortexlab.schedulers.base import BaseScheduler, Batch, SchedulerState


@register("fcfs")
class FCFSScheduler(BaseScheduler):
    """Running requests continue oldest first; waiting ones join in arrival order.

    When memory runs out the newest running request is preempted (recompute). A waiting
    request that does not fit blocks those behind it (strict FCFS, no overtaking).
    """

    def schedule(self, state: SchedulerState) -> Batch:
        """This step's batch under the token budget and sequence limit."""
        batch = Batch()
        budget = state.config.max_num_batched_tokens
        for request in list(state.running):
            if budget == 0:
                break
            if request not in state.running:
                continue  # preempted earlier in this loop
            n = self.chunk(state, request, budget)
            if n and self.reserve(state, request, n, batch):
                batch.add(request, n)
                budget -= n
        if batch.preempted:
            return batch  # memory is short: admit nobody new this step
        for request in list(state.waiting):
            if budget == 0 or len(state.running) >= state.config.max_num_seqs:
                break
            n = self.chunk(state, request, budget)
            if not n or not state.allocator.can_allocate(request, n):
                break
            self.admit(state, request, n)
            batch.add(request, n)
            budget -= n
        return batch
