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


class Trace:
    """Records engine events; `.steps` and `.requests` give them as DataFrames."""

    def __init__(self) -> None:
        self._steps: dict[int, dict] = {}
        self._requests: dict = {}
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
        self.events.append((event.time, event.step, event.name, event.request.request_id))
        # Keep the request object: its final fields are read when the table is built.
        self._requests[event.request.request_id] = event.request

    @property
    def steps(self) -> pd.DataFrame:
        """One row per engine step: batch composition, tokens, KV usage, duration."""
        df = pd.DataFrame(list(self._steps.values()))
        if not df.empty and {"start", "end"} <= set(df.columns):
            df["duration"] = df["end"] - df["start"]
        return df

    @property
    def requests(self) -> pd.DataFrame:
        """One row per request: lengths, timestamps, latencies, outcome."""
        rows = []
        for r in self._requests.values():
            rows.append(
                {
                    "request_id": r.request_id,
                    "state": r.state.value,
                    "finish_reason": r.finish_reason.value if r.finish_reason else None,
                    "num_prompt_tokens": r.num_prompt_tokens,
                    "num_output_tokens": r.num_output_tokens,
                    "num_preemptions": r.num_preemptions,
                    "arrival_time": r.arrival_time,
                    "first_scheduled_time": r.first_scheduled_time,
                    "first_token_time": r.first_token_time,
                    "finish_time": r.finish_time,
                    **request_metrics(r),
                    "error": r.error,
                }
            )
        return pd.DataFrame(rows)

    @property
    def request_events(self) -> pd.DataFrame:
        """Every request event in order: time, step, event name, request id."""
        return pd.DataFrame(self.events, columns=["time", "step", "event", "request_id"])
