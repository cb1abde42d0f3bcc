"""Static priority: lower `SamplingParams.priority` first, evicting lower priorities."""

from __future__ import annotations

from cortexlab.request import Request
from cortexlab.schedulers import register
from cortexlab.schedulers.ranked import RankedScheduler


@register("priority")
class PriorityScheduler(RankedScheduler):
    """Lower `SamplingParams.priority` runs first; ties run in arrival order.

    The classic static-priority discipline of operating systems (Silberschatz et al.,
    *Operating System Concepts*, ch. 5), in the form vLLM's ``--scheduling-policy priority``
    serves LLM requests. When preemptive (the default), a waiting request takes the seat,
    token budget and memory of running requests of strictly lower priority, which are
    paused or, when memory is short, preempted (recompute). Equal priorities never evict
    each other. Starvation of low priorities under a steady high-priority stream is the
    point of the policy, not a bug; use `mlfq` or `ltr` for aging.

    Args:
        preemptive: let a higher-priority arrival evict running lower-priority requests;
            False serves running requests first and only orders the queue.
    """

    def __init__(self, *, preemptive: bool = True) -> None:
        super().__init__()
        if not isinstance(preemptive, bool):
            raise ValueError(f"preemptive must be a bool, got {preemptive!r}")
        self.is_preemptive = preemptive

    def rank(self, request: Request) -> tuple[int, float]:
        """(priority, arrival time): lower runs first."""
        return request.params.priority, request.arrival_time
