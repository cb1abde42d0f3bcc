"""SummaryTrace (bounded-memory summary) and streaming submission (Engine.feed)."""

from __future__ import annotations

import math

import cortexlab as cl
from cortexlab.trace_summary import LogHistogram, Quantiles

import numpy as np
import pytest
from test_sim import CM

SLO = {"ttft": 0.5, "tpot": 0.02}
OPTIONS = dict(backend="sim", cost_model=CM, slo=SLO, max_num_seqs=8, num_blocks=64)


@pytest.fixture(scope="module")
def model():
    return cl.load_model("tiny-random")


@pytest.fixture(scope="module")
def workload():
    # Three tenants and a small arena: preemptions, a service gap, a backlog.
    return cl.workloads.poisson(60.0, num_requests=240, seed=1, tenants={"a": 2, "b": 1, "c": 1})


@pytest.fixture(scope="module")
def full(model, workload):
    return cl.run_workload(model, workload, stream=False, **OPTIONS)


def _same(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-12)


def _percentile(name: str) -> bool:
    return name.rsplit("_", 1)[-1] in ("p50", "p90", "p99")


def test_summary_trace_matches_the_full_trace(model, workload, full) -> None:
    assert full.summary["num_preemptions"] > 0 and full.summary["service_gap"] > 0
    for exact_up_to, bound in ((10_000, 1e-9), (0, 0.005)):
        trace = cl.SummaryTrace(slo=SLO, exact_up_to=exact_up_to)
        engine = cl.Engine(model, clock="simulated", cost_model=CM, max_num_seqs=8, num_blocks=64)
        with engine.hooks(trace.hooks):
            for index, r in enumerate(workload.materialize(model)):
                engine.submit(
                    r.prompt_token_ids, r.params, request_id=index, arrival_time=r.arrival_time
                )
            engine.run_until_done()
        got, want = trace.summary(SLO), full.summary
        assert list(got) == list(want)
        for key, value in want.items():
            # Means, counts, throughput, goodput, service: exact (float summation order).
            rel = bound if _percentile(key) else 1e-9
            assert _same(got[key], value, rel), (exact_up_to, key, got[key], value)
    # With exact_up_to=0 every percentile came from the histogram.
    assert not trace.exact
    steps = trace.steps_summary
    table = full.trace.steps
    for column in ("num_seqs", "num_batched_tokens", "num_running", "kv_used_slots", "duration"):
        assert steps.at[column, "mean"] == pytest.approx(table[column].mean(), rel=1e-9)
        assert steps.at[column, "max"] == table[column].max()
    assert steps.at["kv_utilization", "max"] <= 1.0
    metrics = trace.metrics()
    assert metrics.loc["ttft", "count"] == full.trace.metrics(SLO).loc["ttft", "count"]


def test_summary_trace_refuses_what_it_cannot_know() -> None:
    trace = cl.SummaryTrace(slo=SLO)
    assert trace.metrics().empty
    with pytest.raises(ValueError, match="counted goodput under"):
        trace.summary({"ttft": 9.0})
    with pytest.raises(AttributeError, match="keeps no requests table"):
        trace.requests  # noqa: B018
    with pytest.raises(ValueError, match="exact_up_to"):
        cl.SummaryTrace(exact_up_to=-1)


def test_streaming_submission_is_identical(model, workload, full) -> None:
    streamed = cl.run_workload(model, workload, stream=True, **OPTIONS)
    assert streamed.summary == full.summary
    assert streamed.trace.requests.equals(full.trace.requests)
    assert streamed.trace.steps.drop(columns=["start", "end"]).equals(
        full.trace.steps.drop(columns=["start", "end"])
    )
    summary = cl.run_workload(model, workload, stream=True, trace="summary", **OPTIONS)
    assert summary.summary["num_finished"] == full.summary["num_finished"]
    assert isinstance(summary.trace, cl.SummaryTrace)


def test_feed_keeps_few_requests_alive(model) -> None:
    # Sparse arrivals: the engine idles between them and jumps to each; only the arrived
    # ones and the next arrival are ever submitted.
    engine = cl.Engine(model, clock="simulated", cost_model=CM, max_history=0)
    ids = list(range(5, 15))
    seen = []
    engine.feed((float(i), ids, cl.SamplingParams(max_tokens=2), i) for i in range(50))
    assert engine.has_unfinished and len(engine.requests.active) == 2  # at 0 and 1.0
    with engine.hooks({"step.end": lambda e: seen.append(len(engine.requests.active))}):
        engine.run_until_done()
    assert max(seen) <= 3 and not engine.has_unfinished
    with pytest.raises(ValueError, match="must not decrease"):
        engine.feed([(2.0, ids, None, "x"), (1.0, ids, None, "y")])
        engine.run_until_done()


def test_log_histogram_error_bound() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(-4, 2, 50_000), np.zeros(100)])
    q = Quantiles(exact_up_to=1000, relative_error=0.01)
    q.extend(values[:25_000])
    for v in values[25_000:30_000]:
        q.add(float(v))
    q.extend(values[30_000:])
    stats = q.stats()
    assert not q.is_exact and stats["count"] == values.size
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert stats[name] == pytest.approx(np.percentile(values, p), rel=0.01)
    h = LogHistogram(0.01)
    h.add(np.array([0.0, 1e-12, 5.0, 1e12]))
    est = h.order_statistics(np.arange(4))
    assert est[0] == 0.0 and est[1] <= 1e-9 and est[2] == pytest.approx(5.0, rel=0.01)
    assert est[3] <= 1e12
    with pytest.raises(ValueError, match=">= 0"):
        h.add(np.array([-1.0]))
