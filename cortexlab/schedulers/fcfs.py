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
        budget = self.continue_running(state, batch, state.config.max_num_batched_tokens)
        if not batch.preempted:  # memory is short: admit nobody new this step
            self.admit_in_order(state, batch, budget)
        return batch
