"""Shortest job first, by oracle or predicted output length."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from cortexlab.request import Request
from cortexlab.schedulers import register
from cortexlab.schedulers.base import SchedulerState
from cortexlab.schedulers.ranked import RankedScheduler, drop_departed

MODES = ("oracle", "predicted")


@register("sjf")
class SJFScheduler(RankedScheduler):
    """Shortest remaining job first (Smith 1956; Schrage 1968 for the preemptive SRPT form).

    A job's size is the output tokens it still has to generate, then (to break ties) its
    uncomputed tokens: each output token costs an engine step, while a prompt is prefilled
    in one step or a few chunks alongside other work, so output length is what decides how
    long a job holds its seat (the same ordering Qiu et al. 2024 and Fu et al. 2024 use for
    LLM serving; ranking by prompt + output tokens lets long prompts with short answers
    wait behind short prompts with long answers). In `oracle`
    mode the output length is `params.max_tokens`, exact for workloads, which run with
    ``ignore_eos=True``. In `predicted` mode it is `predictor(request)`, called once per
    request when first seen, as a learned length predictor would be (e.g. Qiu et al. 2024,
    "Efficient Interactive LLM Serving with Proxy Model-based Sequence Length Prediction");
    a job that outlives its prediction counts as having no outputs left. Ties run in
    arrival order.

    Args:
        mode: "oracle" or "predicted".
        predictor: request -> predicted number of output tokens; required for "predicted".
        preemptive: shortest-remaining-first (SRPT): a shorter arrival evicts longer running
            jobs; False (classic SJF) only orders the queue.
    """

    def __init__(
        self,
        *,
        mode: str = "oracle",
        predictor: Callable[[Request], float] | None = None,
        preemptive: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if (mode == "predicted") != (predictor is not None):
            raise ValueError(
                f"predictor must be given exactly when mode='predicted', got mode={mode!r} "
                f"and predictor={predictor!r}"
            )
        if predictor is not None and not callable(predictor):
            raise ValueError(f"predictor must be callable, got {predictor!r}")
        if not isinstance(preemptive, bool):
            raise ValueError(f"preemptive must be a bool, got {preemptive!r}")
        self.mode, self.predictor, self.is_preemptive = mode, predictor, preemptive
        self._predicted: dict[str | int, float] = {}

    def begin(self, state: SchedulerState) -> None:
        """Forget predictions of requests that left."""
        if self.predictor is not None:
            drop_departed(self._predicted, (*state.running, *state.waiting))

    def output_length(self, request: Request) -> float:
        """The job's total output length: the oracle's or the (cached) prediction."""
        if self.predictor is None:
            return request.params.max_tokens
        predicted = self._predicted.get(request.request_id)
        if predicted is None:
            predicted = self.predictor(request)
            if (
                isinstance(predicted, bool)
                or not isinstance(predicted, numbers.Real)
                or not math.isfinite(predicted)
            ):
                raise ValueError(
                    f"predictor must return a finite real number, got {predicted!r} "
                    f"for request {request.request_id!r}"
                )
            predicted = self._predicted[request.request_id] = float(predicted)
        return predicted

    def remaining(self, request: Request) -> float:
        """Output tokens still to generate (by the oracle or the prediction)."""
        return max(self.output_length(request) - request.num_output_tokens, 0)

    def rank(self, request: Request) -> tuple[float, int, float]:
        """(outputs left, uncomputed tokens, arrival time): lower runs first."""
        return self.remaining(request), request.num_uncomputed_tokens, request.arrival_time
