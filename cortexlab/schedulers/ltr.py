"""Learning-to-rank scheduling: serve requests in the order of a predicted length score."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from cortexlab.request import Request
from cortexlab.schedulers import register
from cortexlab.schedulers.base import Batch, SchedulerState
from cortexlab.schedulers.ranked import RankedScheduler, drop_departed


def declared_length(request: Request) -> float:
    """The default score: the output cap the client declared (`params.max_tokens`)."""
    return request.params.max_tokens


@dataclass(slots=True)
class _Job:
    score: float
    num_idle_steps: int = 0
    num_boost_tokens: int = 0  # > 0 while promoted for starving
    promoted: int = 0  # order of promotion: promoted jobs run first-promoted first


@register("ltr")
class LearningToRankScheduler(RankedScheduler):
    """Rank by a learned score, with starvation prevention (Fu et al. 2024, "Efficient LLM
    Scheduling by Learning to Rank", NeurIPS 2024).

    A ranking model scores each request once, on arrival, so that lower scores predict
    shorter outputs; every step serves running and waiting requests together in score
    order (by default preemptively, like the paper's vLLM scheduler: requests left out are
    paused, and evicted with recompute when a better-ranked one needs their seat or
    blocks). Only
    the relative order matters, which is what a ranking model learns better than exact
    lengths. A request left out of `starvation_threshold` consecutive steps is promoted
    above every score until it generates `starvation_quantum` more tokens, the paper's
    guard against starving long jobs. Two departures from the paper's vLLM code, both so
    that every promotion makes progress: the quantum counts generated tokens, not steps
    (a request evicted with recompute would otherwise spend its quantum recomputing), and
    promoted requests run in promotion order rather than by score (so a stream of starving
    short jobs cannot keep outranking a promoted long one).

    The default score is `declared_length` (the request's `max_tokens`): an upper bound a
    client states, and the exact length for workloads, which run with ``ignore_eos=True``;
    pass a model's score to study ranking error.

    Args:
        score: request -> float, lower runs first.
        starvation_threshold: unscheduled steps before a request is promoted (int >= 1).
        starvation_quantum: tokens a promoted request generates before it is ranked by
            its score again (int >= 1).
        preemptive: serve running and waiting requests in one ranking (the paper); False
            lets running requests finish and ranks only the queue, which avoids the
            recomputation that evicting a nearly finished long job costs here.
    """

    def __init__(
        self,
        *,
        score: Callable[[Request], float] = declared_length,
        starvation_threshold: int = 128,
        starvation_quantum: int = 32,
        preemptive: bool = True,
    ) -> None:
        super().__init__()
        if not callable(score):
            raise ValueError(f"score must be callable, got {score!r}")
        for name, value in (
            ("starvation_threshold", starvation_threshold),
            ("starvation_quantum", starvation_quantum),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(preemptive, bool):
            raise ValueError(f"preemptive must be a bool, got {preemptive!r}")
        self.score, self.is_preemptive = score, preemptive
        self.starvation_threshold = starvation_threshold
        self.starvation_quantum = starvation_quantum
        self._jobs: dict[str | int, _Job] = {}
        self._promotions = itertools.count()

    def begin(self, state: SchedulerState) -> None:
        """Score new requests once; forget requests that left."""
        queued = (*state.running, *state.waiting)
        drop_departed(self._jobs, queued)
        for request in queued:
            if request.request_id not in self._jobs:
                value = self.score(request)
                if (
                    isinstance(value, bool)
                    or not isinstance(value, numbers.Real)
                    or math.isnan(value)
                ):
                    raise ValueError(
                        f"score must return a real number (not NaN), got {value!r} "
                        f"for request {request.request_id!r}"
                    )
                self._jobs[request.request_id] = _Job(float(value))

    def is_promoted(self, request: Request) -> bool:
        """True while `request` runs ahead of every score for starving."""
        job = self._jobs.get(request.request_id)
        return job is not None and job.num_boost_tokens > 0

    def rank(self, request: Request) -> tuple[int, float, float]:
        """Promoted requests first, in promotion order; then (score, arrival time)."""
        job = self._jobs[request.request_id]
        if job.num_boost_tokens:
            return 0, job.promoted, 0.0
        return 1, job.score, request.arrival_time

    def end(self, state: SchedulerState, batch: Batch) -> None:
        """Use up promotions of scheduled requests; age and promote the ones left out."""
        scheduled = {id(s.request): s.needs_logits for s in batch.scheduled}
        for request in (*state.running, *state.waiting):
            job = self._jobs[request.request_id]
            if id(request) in scheduled:
                job.num_idle_steps = 0
                if scheduled[id(request)] and job.num_boost_tokens:
                    job.num_boost_tokens -= 1
            else:
                job.num_idle_steps += 1
                if job.num_idle_steps >= self.starvation_threshold:
                    if not job.num_boost_tokens:  # a renewed promotion keeps its place
                        job.promoted = next(self._promotions)
                    job.num_idle_steps, job.num_boost_tokens = 0, self.starvation_quantum
