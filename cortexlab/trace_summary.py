"""`SummaryTrace`: the Trace's `summary()` / `metrics()` in memory that does not grow with
the number of requests (a 100,000-request simulation).

It listens at the same hook points as `cl.Trace` but keeps a request's values only while
it is unfinished: when it ends they are folded into streaming aggregates (counts, sums,
per-tenant service, the fairness gap) and into one `Quantiles` per latency. Step rows are
not kept either: each numeric step column becomes a running count / mean / min / max
(`steps_summary`). Metric definitions are `cortexlab.metrics`' and the numbers are the full
Trace's on the same run: counts, sums, means, throughput, goodput, service and service_gap
exactly (means up to float summation order), percentiles exactly while a latency has at
most `exact_up_to` values and within `relative_error` (0.5% by default) above that.
"""

from __future__ import annotations

import html
import math
from array import array
from collections.abc import Mapping
from itertools import combinations
from typing import Any

from cortexlab.hooks import RequestEvent, StepEvent
from cortexlab.metrics import (
    DECODE_WEIGHT,
    LATENCIES,
    PREFILL_WEIGHT,
    STATISTICS,
    STEP_LATENCIES,
    check_slo,
    flatten,
)
from cortexlab.trace import request_metrics

import numpy as np
import pandas as pd

__all__ = ["LogHistogram", "Quantiles", "SummaryTrace"]

_NAN = float("nan")
_FLUSH = 4096  # values buffered before a histogram update (one numpy call per chunk)


class LogHistogram:
    """Counts of non-negative values in logarithmic bins: a fixed-size quantile sketch.

    Bin ``i >= 1`` holds values in ``(lo * g**(i-1), lo * g**i]`` with ``g = (1 + a) / (1 - a)``
    and reports ``2 * lo * g**i / (g + 1)``, which is within relative error ``a`` of every value
    in the bin (DDSketch's bins, Masson et al., VLDB 2019). Bin 0 holds exact zeros and reports 0;
    values in ``(0, lo]`` go to bin 1 (absolute error at most `lo`), values above `hi` to the
    last bin (reported no higher than the largest value added). With the defaults (a = 0.5%,
    [1e-9, 1e9]) that is 4,146 bins, 33 KB, whatever the number of values.
    """

    def __init__(self, relative_error: float = 0.005, lo: float = 1e-9, hi: float = 1e9) -> None:
        if not 0 < relative_error < 1:
            raise ValueError(f"relative_error must be in (0, 1), got {relative_error!r}")
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
        self.relative_error = relative_error
        self.lo, self.hi = lo, hi
        self._gamma = (1 + relative_error) / (1 - relative_error)
        self._log_gamma = math.log(self._gamma)
        num_bins = int(math.ceil(math.log(hi / lo) / self._log_gamma)) + 1
        self.counts = np.zeros(num_bins + 1, dtype=np.int64)
        self._values = np.concatenate(
            [[0.0], lo * self._gamma ** np.arange(num_bins) * 2 / (self._gamma + 1)]
        )
        self._values[1] = lo  # (0, lo]: reported as lo
        self.min, self.max = math.inf, -math.inf

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def add(self, values: np.ndarray) -> None:
        """Add an array of finite values >= 0."""
        values = np.asarray(values, dtype=float)
        if values.size == 0:
            return
        if values.min() < 0:
            raise ValueError(f"LogHistogram holds values >= 0, got {values.min()!r}")
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        index = np.zeros(values.shape, dtype=np.int64)
        positive = values > 0
        scaled = np.log(np.maximum(values[positive], self.lo) / self.lo) / self._log_gamma
        index[positive] = 1 + np.clip(np.ceil(scaled - 1e-9), 0, len(self.counts) - 2)
        self.counts += np.bincount(index, minlength=len(self.counts))

    def order_statistics(self, ranks: np.ndarray) -> np.ndarray:
        """Estimates of the values at 0-based `ranks` in sorted order."""
        cumulative = np.cumsum(self.counts)
        bins = np.searchsorted(cumulative, ranks, side="right")
        return np.clip(self._values[bins], self.min, self.max)


class Quantiles:
    """Mean, count and numpy-style percentiles of a stream of values in bounded memory.

    Exact (numpy's linear interpolation, as `cortexlab.metrics`) while at most `exact_up_to`
    values came; then a `LogHistogram`: each order statistic within `relative_error` of the
    true one, and so is a percentile, which interpolates two of them with non-negative
    weights. The mean is exact at any size.
    """

    def __init__(self, *, exact_up_to: int = 10_000, relative_error: float = 0.005) -> None:
        self.exact_up_to = exact_up_to
        self.relative_error = relative_error
        self.count = 0
        self.total = 0.0
        self._buffer = array("d")
        self._histogram: LogHistogram | None = None

    @property
    def is_exact(self) -> bool:
        return self._histogram is None

    def add(self, value: float) -> None:
        """Add one value; NaN and infinities are skipped (as the metrics skip them)."""
        if not math.isfinite(value):
            return
        self.count += 1
        self.total += value
        self._buffer.append(value)
        self._spill()

    def extend(self, values: np.ndarray) -> None:
        """Add an array of values (non-finite ones skipped)."""
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        self.count += int(values.size)
        self.total += float(values.sum())
        self._buffer.extend(values.tolist())
        self._spill()

    def _spill(self) -> None:
        limit = self.exact_up_to if self._histogram is None else _FLUSH
        if len(self._buffer) > limit:
            if self._histogram is None:
                self._histogram = LogHistogram(self.relative_error)
            self._histogram.add(np.frombuffer(self._buffer, dtype=float))
            self._buffer = array("d")

    def stats(self) -> dict[str, float]:
        """mean, p50, p90, p99 and count, as `cortexlab.metrics` reports them."""
        if self.count == 0:
            return dict.fromkeys(STATISTICS, _NAN) | {"count": 0}
        qs = np.array([0.5, 0.9, 0.99])
        pending = np.frombuffer(self._buffer, dtype=float)
        if self._histogram is None:
            p50, p90, p99 = np.percentile(pending, qs * 100)
        else:
            histogram = self._histogram
            if pending.size:  # a copy: the live sketch takes them at its next flush
                histogram = LogHistogram(self.relative_error)
                histogram.counts = self._histogram.counts.copy()
                histogram.min, histogram.max = self._histogram.min, self._histogram.max
                histogram.add(pending)
            h = (self.count - 1) * qs
            below = np.floor(h).astype(np.int64)
            above = np.minimum(below + 1, self.count - 1)
            lo, hi = histogram.order_statistics(below), histogram.order_statistics(above)
            p50, p90, p99 = lo + (h - below) * (hi - lo)
        return {
            "mean": self.total / self.count,
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "count": self.count,
        }


class _Live:
    """What the summary needs of an unfinished request (its values as of its last event)."""

    __slots__ = (
        "tenant",
        "state",
        "arrival_time",
        "scheduled",
        "finish_time",
        "num_prompt_tokens",
        "num_output_tokens",
        "num_preemptions",
        "arrival_step",
        "first_scheduled_step",
        "first_token_step",
    )

    def __init__(self) -> None:
        self.arrival_step = self.first_scheduled_step = self.first_token_step = None


class SummaryTrace:
    """Records a run as streaming aggregates: `summary()` and `metrics()` as `cl.Trace`'s, in
    memory that stays flat however many requests run (no per-request or per-step rows).

    Pass ``trace.hooks`` to ``engine.hooks(...)`` as for `cl.Trace`. Goodput needs the SLO
    while the run goes (a request's values are gone once it is folded in): give it here;
    ``summary()`` and ``metrics()`` report it, and refuse another one. Percentiles are exact up
    to `exact_up_to` values per latency, then within `relative_error` (relative; see
    `LogHistogram`); counts, means, throughput, goodput, service and service_gap are exact.
    `steps_summary` has count / mean / min / max of each numeric step column.
    """

    def __init__(
        self,
        *,
        slo: Mapping[str, float] | None = None,
        exact_up_to: int = 10_000,
        relative_error: float = 0.005,
    ) -> None:
        if isinstance(exact_up_to, bool) or not isinstance(exact_up_to, int) or exact_up_to < 0:
            raise ValueError(f"exact_up_to must be an int >= 0, got {exact_up_to!r}")
        if not isinstance(relative_error, float | int) or not 0 < relative_error < 1:
            raise ValueError(f"relative_error must be in (0, 1), got {relative_error!r}")
        self.slo = check_slo(slo)
        self.exact_up_to = exact_up_to
        self.relative_error = float(relative_error)
        self._live: dict[Any, _Live] = {}
        self._latencies = {
            name: Quantiles(exact_up_to=exact_up_to, relative_error=self.relative_error)
            for name in (*LATENCIES, *STEP_LATENCIES)
        }
        self._num_ended: dict[str, int] = {}  # by final state
        self._first_arrival = math.inf
        self._last_finish = -math.inf
        self._finished_output_tokens = 0
        self._ended_preemptions = 0
        self._ended_service: dict[str, float] = {}
        self._num_good = 0
        # Steps: running aggregates per numeric column, and the fairness gap's state.
        self._step_columns: dict[str, list[float]] = {}  # name -> [count, sum, min, max]
        self._num_steps = 0
        self._saw_batch = False
        self._served: dict[str, float] = {}  # this step's service per tenant
        self._backlog: dict[str, int] = {}  # per tenant: arrived, unfinished requests
        self._ended_at: dict[str, int] = {}  # per tenant: the step its last request ended
        self._pairs: dict[tuple[str, str], list[float]] = {}  # running, low, high
        self._service_gap = 0.0

    def __repr__(self) -> str:
        return (
            f"SummaryTrace({self.num_requests} requests ({len(self._live)} unfinished), "
            f"{self._num_steps} steps, exact_up_to={self.exact_up_to}, "
            f"relative_error={self.relative_error})"
        )

    @property
    def num_requests(self) -> int:
        return sum(self._num_ended.values()) + len(self._live)

    @property
    def hooks(self) -> dict:
        """The hook mapping to pass to `engine.hooks(...)` or `engine.add_hook`."""
        return {
            "step.batch": self._on_batch,
            "step.end": self._on_step_end,
            "request.*": self._on_request,
        }

    # -- requests -------------------------------------------------------------------------
    def _on_request(self, event: RequestEvent) -> None:
        request = event.request
        rid = request.request_id
        live = self._live.get(rid)
        if live is None:
            live = self._live[rid] = _Live()
            live.tenant = request.params.tenant
        name = event.name
        if name == "request.arrived" and live.arrival_step is None:
            live.arrival_step = event.step
            self._backlog[live.tenant] = self._backlog.get(live.tenant, 0) + 1
        elif name == "request.scheduled" and live.first_scheduled_step is None:
            live.first_scheduled_step = event.step
        elif name == "request.first_token" and live.first_token_step is None:
            live.first_token_step = event.step
        if name == "request.finished":
            del self._live[rid]
            self._fold(request, live, event.step)
            return
        live.state = request.state.value
        live.arrival_time = request.arrival_time
        live.scheduled = request.first_scheduled_time is not None
        live.finish_time = request.finish_time
        live.num_prompt_tokens = request.num_prompt_tokens
        live.num_output_tokens = request.num_output_tokens
        live.num_preemptions = request.num_preemptions

    def _fold(self, request: Any, live: _Live, finish_step: int) -> None:
        """A request ended: add it to the aggregates and forget it."""
        state = request.state.value
        tenant = live.tenant
        n = request.num_output_tokens
        self._num_ended[state] = self._num_ended.get(state, 0) + 1
        self._first_arrival = min(self._first_arrival, request.arrival_time)
        if request.finish_time is not None:
            self._last_finish = max(self._last_finish, request.finish_time)
        self._ended_preemptions += request.num_preemptions
        self._ended_service[tenant] = self._ended_service.get(tenant, 0.0) + _service(
            request.first_scheduled_time is not None, request.num_prompt_tokens, n
        )
        if live.arrival_step is not None:
            self._backlog[tenant] -= 1
            self._ended_at[tenant] = finish_step
        if state != "finished":
            return
        self._finished_output_tokens += n
        values = request_metrics(request)
        values["normalized_latency"] = values["e2e"] / n if n else _NAN
        gaps = np.diff(np.asarray(request.token_times, dtype=float))
        values["itl_max"] = float(gaps.max()) if gaps.size else 0.0
        for name in ("queue_delay", "ttft", "tpot", "e2e", "normalized_latency"):
            self._latencies[name].add(values[name])
        self._latencies["itl"].extend(gaps)
        start = live.arrival_step
        steps = self._latencies
        if start is not None and live.first_scheduled_step is not None:
            steps["queue_delay_steps"].add(live.first_scheduled_step - start)
        if start is not None and live.first_token_step is not None:
            steps["ttft_steps"].add(live.first_token_step - start + 1)
        if start is not None:
            steps["e2e_steps"].add(finish_step - start + 1)
        if live.first_token_step is not None and n > 1:
            steps["tpot_steps"].add((finish_step - live.first_token_step) / (n - 1))
        if self.slo and all(
            (0.0 if math.isnan(values[key]) else values[key]) <= bound
            for key, bound in self.slo.items()
        ):
            self._num_good += 1

    # -- steps ----------------------------------------------------------------------------
    def _on_batch(self, event: StepEvent) -> None:
        data = event.data
        self._saw_batch = True
        self._served = {}
        for rid, count, prefill in zip(
            data.get("request_ids", ()),
            data.get("num_new_tokens", ()),
            data.get("is_prefill", ()),
            strict=True,
        ):
            live = self._live.get(rid)
            if live is not None:
                weight = PREFILL_WEIGHT if prefill else DECODE_WEIGHT
                self._served[live.tenant] = self._served.get(live.tenant, 0.0) + count * weight
        self._add_columns(data)

    def _on_step_end(self, event: StepEvent) -> None:
        data = dict(event.data)
        if data.get("kv_num_slots"):
            data["kv_utilization"] = data.get("kv_used_slots", _NAN) / data["kv_num_slots"]
        self._add_columns(data)
        self._num_steps += 1
        self._step_gap(event.step)
        self._served = {}

    def _add_columns(self, data: Mapping) -> None:
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            column = self._step_columns.get(key)
            if column is None:
                self._step_columns[key] = [1, value, value, value]
            else:
                column[0] += 1
                column[1] += value
                column[2] = min(column[2], value)
                column[3] = max(column[3], value)

    def _step_gap(self, step: int) -> None:
        """Advance `metrics.service_gap`'s running differences by one step."""
        tenants = sorted(set(self._backlog) | set(self._ended_at))
        if len(tenants) < 2:
            return
        busy = {t: self._backlog.get(t, 0) > 0 or self._ended_at.get(t) == step for t in tenants}
        for a, b in combinations(tenants, 2):
            state = self._pairs.setdefault((a, b), [0.0, 0.0, 0.0])
            if not (busy[a] and busy[b]):
                state[:] = [0.0, 0.0, 0.0]
                continue
            state[0] += self._served.get(a, 0.0) - self._served.get(b, 0.0)
            state[1], state[2] = min(state[1], state[0]), max(state[2], state[0])
            self._service_gap = max(self._service_gap, state[2] - state[1])

    @property
    def steps_summary(self) -> pd.DataFrame:
        """Per numeric step column (step.batch and step.end numbers, plus kv_utilization =
        kv_used_slots / kv_num_slots): count, mean, min and max over the steps it had."""
        rows = {
            name: {"count": c, "mean": s / c, "min": lo, "max": hi}
            for name, (c, s, lo, hi) in self._step_columns.items()
        }
        table = pd.DataFrame.from_dict(
            rows, orient="index", columns=["count", "mean", "min", "max"]
        )
        table.index.name = "column"
        return table

    # -- results --------------------------------------------------------------------------
    def _check_slo(self, slo: Mapping[str, float] | None) -> dict[str, float]:
        if slo is not None and check_slo(slo) != self.slo:
            raise ValueError(
                f"this SummaryTrace counted goodput under slo={self.slo or None} (given when "
                f"it was made); it keeps no per-request values to judge slo={dict(slo)}: "
                f"record with cl.SummaryTrace(slo=...) or a full cl.Trace()"
            )
        return self.slo

    def _scalars(self) -> dict[str, float]:
        live = list(self._live.values())
        num_requests = self.num_requests
        start = min([self._first_arrival, *(r.arrival_time for r in live)])
        finishes = [self._last_finish, *(r.finish_time for r in live if r.finish_time is not None)]
        end = max(finishes)
        duration = end - start if math.isfinite(end - start) and end > start else _NAN
        num_finished = self._num_ended.get("finished", 0)

        def per_second(x: float) -> float:
            return x / duration if not math.isnan(duration) else _NAN

        out = {
            "num_requests": float(num_requests),
            "num_finished": float(num_finished),
            "num_failed": float(self._num_ended.get("failed", 0)),
            "num_cancelled": float(self._num_ended.get("cancelled", 0)),
            "duration": float(duration),
            "throughput_rps": per_second(num_finished),
            "output_tps": per_second(float(self._finished_output_tokens)),
            "num_preemptions": float(
                self._ended_preemptions + sum(r.num_preemptions for r in live)
            ),
        }
        if self.slo:
            out["goodput_share"] = self._num_good / num_requests
            out["goodput_rps"] = per_second(float(self._num_good))
        service = dict(self._ended_service)
        for r in live:
            service[r.tenant] = service.get(r.tenant, 0.0) + _service(
                r.scheduled, r.num_prompt_tokens, r.num_output_tokens
            )
        for tenant in sorted(service):
            out[f"service[{tenant}]"] = float(service[tenant])
        if len(service) > 1:
            out["service_gap"] = float(self._service_gap) if self._saw_batch else _NAN
        return out

    def metrics(self, slo: Mapping[str, float] | None = None) -> pd.DataFrame:
        """As `cl.Trace.metrics`: one row per statistic (mean, p50, p90, p99, count). `slo`
        must be None or the one given at construction (goodput is counted as the run goes)."""
        self._check_slo(slo)
        if self.num_requests == 0:
            return pd.DataFrame(columns=[*STATISTICS, "count"])
        rows = {name: self._latencies[name].stats() for name in (*LATENCIES, *STEP_LATENCIES)}
        num_requests = self.num_requests
        for name, value in self._scalars().items():
            rows[name] = {"mean": value, "count": num_requests}
        table = pd.DataFrame.from_dict(rows, orient="index")[[*STATISTICS, "count"]]
        table.index.name = "metric"
        return table

    def summary(self, slo: Mapping[str, float] | None = None) -> dict[str, float]:
        """`metrics()` flattened to one dict (`ttft_p50`, `throughput_rps`, ...), as
        `cl.Trace.summary`; goodput under the construction's SLO."""
        return flatten(self.metrics(slo))

    @property
    def exact(self) -> bool:
        """True while every percentile is still exact (no latency passed `exact_up_to`)."""
        return all(q.is_exact for q in self._latencies.values())

    def _unavailable(self, what: str) -> Any:
        raise AttributeError(
            f"a SummaryTrace keeps no {what}, only aggregates (summary(), metrics(), "
            f"steps_summary): record with cl.Trace() for per-request and per-step rows"
        )

    @property
    def requests(self) -> pd.DataFrame:
        return self._unavailable("requests table")

    @property
    def steps(self) -> pd.DataFrame:
        return self._unavailable("steps table")

    def _repr_html_(self) -> str:
        summary = self.summary() if self.num_requests else {}
        shown = [k for k in ("num_finished", "ttft_p50", "ttft_p99", "tpot_p50", "e2e_p99",
                             "throughput_rps", "output_tps") if k in summary]  # fmt: skip
        cells = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{summary[k]:.4g}</td></tr>"
            for k in shown
        )
        return f"<div><b>{html.escape(repr(self))}</b><table>{cells}</table></div>"


def _service(scheduled: bool, num_prompt_tokens: int, num_output_tokens: int) -> float:
    """`metrics.service_by_tenant` for one request."""
    prompt = num_prompt_tokens if scheduled else 0
    return PREFILL_WEIGHT * prompt + DECODE_WEIGHT * num_output_tokens
