"""The Trace: hooks that record every step and request event, read back as DataFrames."""

from __future__ import annotations

from cortexlab.hooks import RequestEvent, StepEvent

import pandas as pd


def request_metrics(request) -> dict:
    """Latency numbers of one request (seconds on the engine clock; NaN where undefined)."""
    nan = float("nan")
    arrival, first_token, finish = (
        request.arrival_time,
        request.first_token_time,
        request.finish_time,
    )
    times = request.token_times
    n = len(times)
    return {
        "queue_delay": (request.first_scheduled_time - arrival)
        if request.first_scheduled_time is not None
        else nan,
        "ttft": first_token - arrival if first_token is not None else nan,
        # Time per output token after the first: the decode rate a user sees.
        "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else nan,
        "e2e": finish - arrival if finish is not None else nan,
    }


def request_row(request) -> dict:
    """A request's reported values now (a plain dict: keeps no reference to the request)."""
    return {
        "request_id": request.request_id,
        "state": request.state.value,
        "finish_reason": request.finish_reason.value if request.finish_reason else None,
        "num_prompt_tokens": request.num_prompt_tokens,
        "num_output_tokens": request.num_output_tokens,
        "num_preemptions": request.num_preemptions,
        "tenant": request.params.tenant,
        "priority": request.params.priority,
        "arrival_time": request.arrival_time,
        "first_scheduled_time": request.first_scheduled_time,
        "first_token_time": request.first_token_time,
        "finish_time": request.finish_time,
        **request_metrics(request),
        "error": request.error,
    }


class Trace:
    """Records engine events; `.steps` and `.requests` give them as DataFrames.

    It keeps the values it reports, never the `Request` objects, so a finished request is
    freed once the engine lets go of it.
    """

    def __init__(self) -> None:
        self._steps: dict[int, dict] = {}
        self._requests: dict = {}
        self._token_times: dict = {}
        self.events: list = []

    @property
    def hooks(self) -> dict:
        """The hook mapping to pass to `engine.hooks(...)` or `engine.add_hook`."""
        return {"step.*": self._on_step, "request.*": self._on_request}

    def _on_step(self, event: StepEvent) -> None:
        row = self._steps.setdefault(event.step, {"step": event.step})
        if event.name == "step.begin":
            row["start"] = event.time
        elif event.name == "step.end":
            row["end"] = event.time
        row.update(event.data)

    def _on_request(self, event: RequestEvent) -> None:
        request = event.request
        self.events.append((event.time, event.step, event.name, request.request_id))
        self._requests[request.request_id] = request_row(request)
        if event.name == "request.finished":
            self._token_times[request.request_id] = tuple(request.token_times)

    @property
    def steps(self) -> pd.DataFrame:
        """One row per engine step: batch composition, tokens, KV usage, measured duration."""
        return pd.DataFrame(list(self._steps.values()))

    @property
    def requests(self) -> pd.DataFrame:
        """One row per request: lengths, timestamps, latencies, outcome (as last seen)."""
        return pd.DataFrame(list(self._requests.values()))

    @property
    def request_events(self) -> pd.DataFrame:
        """Every request event in order: time, step, event name, request id."""
        return pd.DataFrame(self.events, columns=["time", "step", "event", "request_id"])
