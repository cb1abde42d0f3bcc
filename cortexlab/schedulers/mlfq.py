"""FastServe's skip-join multi-level feedback queue."""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass

from cortexlab.request import Request
from cortexlab.schedulers import register
from cortexlab.schedulers.base import Batch, SchedulerState
from cortexlab.schedulers.ranked import RankedScheduler, drop_departed


@dataclass(slots=True)
class _Job:
    level: int
    entered: int  # order of entry into the level: FIFO within a level
    num_used_tokens: int = 0  # service received at the current level
    num_idle_steps: int = 0
    num_served_tokens: int = 0  # positions ever computed: recomputing them is free


@register("mlfq")
class MLFQScheduler(RankedScheduler):
    """Skip-join MLFQ from FastServe (Wu et al. 2023, "Fast Distributed Inference Serving
    for Large Language Models").

    Level `i` grants a quantum of ``quantum * quantum_ratio**i`` tokens of service: the
    prompt and decode tokens the model processes for the request (FastServe counts time;
    here a step's cost grows with its tokens). Skip-join: a new request enters the first
    level whose quantum covers its prompt, so long prompts do not block short jobs at the
    top. A request that uses up its level's quantum is demoted one level (the last level
    keeps it). Levels are served top first, FIFO within a level, preemptively: a
    higher-level request pauses lower-level running ones (they keep their blocks) and,
    when seats or memory are short, evicts them (recompute; FastServe swaps to host memory
    instead). Recomputing tokens is free service, so an evicted job keeps its place and a
    promoted one cannot spend its quantum recomputing. With `starvation_steps`, a request
    left out of that many consecutive steps is promoted back to the top level, FastServe's
    guard against starvation.

    Args:
        quantum: tokens of service the top level grants (int >= 1).
        num_levels: number of levels (int >= 1).
        quantum_ratio: how much each level's quantum grows over the one above (>= 1).
        starvation_steps: promote after this many unscheduled steps (int >= 1), or None.
    """

    is_preemptive = True

    def __init__(
        self,
        *,
        quantum: int = 64,
        num_levels: int = 5,
        quantum_ratio: float = 2.0,
        starvation_steps: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("quantum", quantum), ("num_levels", num_levels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(quantum_ratio, bool)
            or not isinstance(quantum_ratio, numbers.Real)
            or not 1 <= quantum_ratio < float("inf")
        ):
            raise ValueError(f"quantum_ratio must be a finite real >= 1, got {quantum_ratio!r}")
        if starvation_steps is not None and (
            isinstance(starvation_steps, bool)
            or not isinstance(starvation_steps, int)
            or starvation_steps < 1
        ):
            raise ValueError(
                f"starvation_steps must be None or an int >= 1, got {starvation_steps!r}"
            )
        self.quantum, self.num_levels, self.quantum_ratio = quantum, num_levels, quantum_ratio
        self.starvation_steps = starvation_steps
        self.quanta = [quantum * quantum_ratio**i for i in range(num_levels)]
        self._jobs: dict[str | int, _Job] = {}
        self._entries = itertools.count()

    def level_of(self, request: Request) -> int | None:
        """The level `request` is queued at (0 is the top), or None if not seen yet."""
        job = self._jobs.get(request.request_id)
        return None if job is None else job.level

    def begin(self, state: SchedulerState) -> None:
        """Skip-join new requests; forget requests that left."""
        queued = (*state.running, *state.waiting)
        drop_departed(self._jobs, queued)
        for request in queued:
            if request.request_id not in self._jobs:
                n = request.num_prompt_tokens
                level = next((i for i, q in enumerate(self.quanta) if q >= n), self.num_levels - 1)
                self._jobs[request.request_id] = _Job(level, next(self._entries))

    def rank(self, request: Request) -> tuple[int, int]:
        """(level, entry order into the level): lower runs first."""
        job = self._jobs[request.request_id]
        return job.level, job.entered

    def end(self, state: SchedulerState, batch: Batch) -> None:
        """Charge service, demote jobs that used their quantum, age or promote the rest."""
        served = {s.request.request_id: s.num_new_tokens for s in batch.scheduled}
        for request in (*state.running, *state.waiting):
            job = self._jobs[request.request_id]
            n = served.get(request.request_id)
            if n is not None:
                job.num_idle_steps = 0
                num_tokens_after = request.num_computed_tokens + n
                job.num_used_tokens += max(num_tokens_after - job.num_served_tokens, 0)
                job.num_served_tokens = max(num_tokens_after, job.num_served_tokens)
                if (
                    job.num_used_tokens >= self.quanta[job.level]
                    and job.level < self.num_levels - 1
                ):
                    self._move(job, job.level + 1)
            elif self.starvation_steps is not None:
                job.num_idle_steps += 1
                if job.num_idle_steps >= self.starvation_steps:
                    self._move(job, 0)

    def _move(self, job: _Job, level: int) -> None:
        job.level, job.entered = level, next(self._entries)
        job.num_used_tokens = job.num_idle_steps = 0
