"""Experiments: run_workload, compare and sweep (with its on-disk cache) on tiny-random."""

from __future__ import annotations

import functools
import json
import math

import cortexlab as cl
from cortexlab import experiment
from cortexlab.experiment import SUMMARY_COLUMNS, Comparison, config_hash
from cortexlab.schedulers import FCFSScheduler, MLFQScheduler, SJFScheduler
from cortexlab.workloads import Uniform, Workload

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

# Small KV arena and batch: requests queue, and in a burst every policy preempts.
LIMITS = {"block_size": 4, "num_blocks": 12, "max_num_seqs": 3}
LENGTHS = {"prompt_len": Uniform(4, 20), "output_len": Uniform(1, 8), "tenants": {"a": 1, "b": 1}}


def small_workload(rate: float = 40.0, seed: int = 0, num_requests: int = 8) -> Workload:
    return cl.workloads.poisson(rate, num_requests=num_requests, seed=seed, **LENGTHS)


def my_fcfs(state):
    """A plain-function scheduler."""
    return FCFSScheduler().schedule(state)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return small_workload()


@pytest.fixture(scope="module")
def mlfq() -> MLFQScheduler:
    return MLFQScheduler(quantum=8)


@pytest.fixture(scope="module")
def comparison(tiny, workload, mlfq) -> Comparison:
    return cl.compare(
        tiny,
        workload,
        ["fcfs", "sjf", my_fcfs, mlfq],
        slo={"ttft": 0.5, "tpot": 0.1},
        progress=False,
        **LIMITS,
    )


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# -- run_workload ---------------------------------------------------------------------------
def test_run_workload_gives_every_request_its_output_len(tiny, workload):
    run = cl.run_workload(tiny, workload, **LIMITS)
    df = run.trace.requests.set_index("request_id").sort_index()
    expected = [r.output_len for r in workload]
    assert list(df.index) == list(range(len(workload)))
    assert (df["state"] == "finished").all()
    assert df["num_output_tokens"].tolist() == expected
    assert [len(run.trace.output_token_ids[i]) for i in df.index] == expected
    # Arrivals keep the workload's spacing on the engine clock.
    arrivals = [r.arrival_time for r in workload]
    assert df["arrival_time"].tolist() == pytest.approx(arrivals, abs=1e-9)
    assert df["tenant"].tolist() == [r.tenant for r in workload]
    assert run.summary["num_finished"] == len(workload)
    assert run.error is None
    assert run.name == "fcfs"
    assert run.config == {"scheduler": "fcfs", "allocator": "paged", "clock": "measured"} | LIMITS
    assert "<b>fcfs</b>" in run._repr_html_()


def test_run_workload_rejects_a_non_workload(tiny):
    with pytest.raises(TypeError, match="Workload"):
        cl.run_workload(tiny, [(0.0, [1, 2, 3])])


def test_greedy_outputs_do_not_depend_on_the_scheduler(tiny, workload, comparison):
    # Policies decide when tokens are computed, never which: greedy outputs are the same.
    reference = comparison["fcfs"].trace.output_token_ids
    assert len(reference) == len(workload)
    for name in comparison:
        assert comparison[name].trace.output_token_ids == reference, name
    # ... preemption (recompute) included: a burst into the small arena preempts under
    # every policy, deterministically (all arrive at 0, so no timing decides anything).
    burst = cl.workloads.burst(8, seed=0, **LENGTHS)
    policies = ["fcfs", "sjf", "mlfq", "sarathi", "fair", "priority"]
    runs = cl.compare(tiny, burst, policies, progress=False, **LIMITS)
    assert (runs.summary["num_preemptions"] >= 1).all()
    reference = runs["fcfs"].trace.output_token_ids
    assert [len(reference[r.index]) for r in burst] == [r.output_len for r in burst]
    for name in policies:
        assert runs[name].trace.output_token_ids == reference, name


# -- compare --------------------------------------------------------------------------------
def test_compare_summary_is_indexed_by_policy_name(comparison):
    summary = comparison.summary
    assert list(summary.index) == ["fcfs", "sjf", "my_fcfs", "mlfq"]
    assert summary.index.name == "policy"
    assert list(comparison) == list(summary.index)
    assert len(comparison) == 4
    # Every headline column (goodput: an SLO was given; service_gap: two tenants) comes
    # first, in SUMMARY_COLUMNS order; the rest of the flat summary follows.
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == list(SUMMARY_COLUMNS)
    assert {"ttft_p90", "itl_mean", "goodput_rps", "service[a]", "service[b]"} <= set(summary)
    assert (summary["num_finished"] == 8).all()
    assert summary.loc["sjf"].to_dict() == comparison["sjf"].summary
    assert comparison.slo == {"ttft": 0.5, "tpot": 0.1}
    html = comparison._repr_html_()
    assert "my_fcfs" in html and "goodput_share" in html


def test_compare_runs_keep_their_traces(comparison, workload):
    trace = comparison["sjf"].trace
    assert len(trace.requests) == len(workload)
    assert comparison.traces["sjf"] is trace
    assert trace.metrics().loc["ttft", "count"] == len(workload)
    assert comparison["my_fcfs"].config["scheduler"] == "my_fcfs"


def test_compare_leaves_a_scheduler_instance_as_it_was(comparison, mlfq):
    assert mlfq._jobs == {}
    assert next(mlfq._entries) == 0  # the run used a copy; this one never counted


def test_compare_rejects_duplicate_names_and_accepts_a_dict(tiny):
    one = small_workload(num_requests=2)
    with pytest.raises(ValueError, match=r"distinct names.*\['fcfs', 'fcfs'\].*dict"):
        cl.compare(tiny, one, ["fcfs", FCFSScheduler()], progress=False)
    with pytest.raises(ValueError, match="distinct names"):
        cl.compare(tiny, one, [SJFScheduler(), SJFScheduler(preemptive=True)], progress=False)
    named = cl.compare(
        tiny,
        one,
        {"sjf": SJFScheduler(), "srpt": SJFScheduler(preemptive=True)},
        progress=False,
    )
    assert list(named.summary.index) == ["sjf", "srpt"]


def test_compare_plots_return_axes(comparison):
    assert isinstance(comparison.plot_latency_cdf(), Axes)
    assert isinstance(comparison.plot_latency_cdf("e2e"), Axes)
    assert isinstance(comparison.plot_metrics(), Axes)
    _, ax = plt.subplots()
    assert comparison.plot_metrics(("tpot_p50", "goodput_share"), ax=ax) is ax


# -- sweep ----------------------------------------------------------------------------------
SWEEP = {"schedulers": ["fcfs", "sjf"], "rates": [20.0, 80.0], "progress": False}


def test_sweep_caches_every_configuration(tiny, tmp_path, monkeypatch):
    wl = small_workload(num_requests=4)
    first = cl.sweep(tiny, wl, cache_dir=tmp_path, slo={"ttft": 0.5}, **SWEEP, **LIMITS)
    assert len(first) == 4
    assert first[["scheduler", "rate"]].values.tolist() == [
        ["fcfs", 20.0],
        ["fcfs", 80.0],
        ["sjf", 20.0],
        ["sjf", 80.0],
    ]
    assert (first["num_finished"] == 4).all()
    assert first["config"].is_unique
    files = sorted(tmp_path.glob("*.json"))
    assert [f.stem for f in files] == sorted(first["config"])
    for f in files:  # standard JSON: no NaN literal
        assert "NaN" not in f.read_text()
        assert json.loads(f.read_text())["num_finished"] == 4

    def no_recompute(*args, **kwargs):
        raise AssertionError("sweep recomputed a cached configuration")

    monkeypatch.setattr(experiment, "run_workload", no_recompute)
    again = cl.sweep(tiny, wl, cache_dir=tmp_path, slo={"ttft": 0.5}, **SWEEP, **LIMITS)
    pd.testing.assert_frame_equal(again, first)  # same rows, same columns, same order

    # Anything that changes results misses the cache.
    with pytest.raises(AssertionError, match="recomputed"):
        cl.sweep(tiny, wl, cache_dir=tmp_path, slo={"ttft": 0.4}, **SWEEP, **LIMITS)
    with pytest.raises(AssertionError, match="recomputed"):
        cl.sweep(tiny, wl, cache_dir=tmp_path, **SWEEP, **LIMITS | {"max_num_seqs": 2})


def test_sweep_without_a_cache_dir_writes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = cl.sweep(tiny, small_workload(num_requests=2), cache_dir=None, progress=False)
    assert len(rows) == 1 and rows.loc[0, "scheduler"] == "fcfs"
    assert not list(tmp_path.rglob("*"))


def test_sweep_over_a_workload_function_and_seeds(tiny):
    calls = []

    def workload(rate, seed):
        calls.append((rate, seed))
        return small_workload(rate, seed, num_requests=3)

    rows = cl.sweep(
        tiny, workload, rates=[10.0, 30.0], seeds=[0, 1], cache_dir=None, progress=False
    )
    assert calls == [(10.0, 0), (10.0, 1), (30.0, 0), (30.0, 1)]
    assert rows[["rate", "seed"]].values.tolist() == [[10.0, 0], [10.0, 1], [30.0, 0], [30.0, 1]]
    assert rows["config"].is_unique
    assert (rows["num_finished"] == 3).all()


def test_sweep_rejects_seeds_with_a_workload(tiny, workload):
    with pytest.raises(ValueError, match=r"seeds=\[0, 1\].*function f\(rate=..., seed=...\)"):
        cl.sweep(tiny, workload, seeds=[0, 1], cache_dir=None, progress=False)


# -- the cache key --------------------------------------------------------------------------
def key(tiny, **changes) -> str:
    config = {
        "model": tiny,
        "workload": small_workload(),
        "scheduler": "fcfs",
        "allocator": "paged",
        "slo": {},
    }
    return config_hash(config | changes)


def scaled_predictor(factor):
    return lambda request: factor * request.num_prompt_tokens


def test_config_hash_is_stable_for_equal_configurations(tiny):
    assert key(tiny) == key(tiny)
    assert key(tiny, scheduler=MLFQScheduler(quantum=8)) == key(
        tiny, scheduler=MLFQScheduler(quantum=8)
    )
    sjf = SJFScheduler(mode="predicted", predictor=scaled_predictor(2))
    assert "0x" not in json.dumps(experiment._fingerprint(sjf))  # no memory address
    assert key(tiny, scheduler=sjf) == key(
        tiny, scheduler=SJFScheduler(mode="predicted", predictor=scaled_predictor(2))
    )


def limited_fcfs(state, limit=1):
    return FCFSScheduler().schedule(state)


def predicted_sjf(factor):
    return SJFScheduler(mode="predicted", predictor=scaled_predictor(factor))


# (what changes, the configuration it changes from: defaults to key()'s)
CHANGES = {
    "scheduler": ({"scheduler": "sjf"}, {}),
    "function scheduler": ({"scheduler": my_fcfs}, {}),
    "mlfq quantum": (
        {"scheduler": MLFQScheduler(quantum=16)},
        {"scheduler": MLFQScheduler(quantum=8)},
    ),
    "sjf preemptive": ({"scheduler": SJFScheduler(preemptive=True)}, {"scheduler": SJFScheduler()}),
    "predictor closure": ({"scheduler": predicted_sjf(3)}, {"scheduler": predicted_sjf(2)}),
    "partial keyword": (
        {"scheduler": functools.partial(limited_fcfs, limit=2)},
        {"scheduler": functools.partial(limited_fcfs, limit=1)},
    ),
    "workload seed": ({"workload": small_workload(seed=1)}, {}),
    "workload rate": ({"workload": small_workload().with_rate(20.0)}, {}),
    "slo": ({"slo": {"ttft": 1.0}}, {}),
    "engine limit": ({"max_num_seqs": 4}, {}),
    "clock": ({"clock": "wall"}, {}),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_config_hash_changes_with_what_changes_results(tiny, name):
    changed, base = CHANGES[name]
    assert key(tiny, **changed) != key(tiny, **base)


def test_config_hash_tells_models_apart_by_weights(tiny):
    other = cl.models.tiny_random(seed=1)
    assert other.name == tiny.name and other.num_parameters == tiny.num_parameters
    assert key(tiny, model=other) != key(tiny)


def test_config_hash_tells_function_schedulers_apart_by_closure(tiny):
    def make(limit):
        def schedule(state):
            return FCFSScheduler().schedule(state) if limit else None

        return schedule

    assert key(tiny, scheduler=make(1)) == key(tiny, scheduler=make(1))
    assert key(tiny, scheduler=make(1)) != key(tiny, scheduler=make(2))


def test_config_hash_is_unchanged_by_a_run(tiny, workload):
    mlfq = MLFQScheduler(quantum=8)
    before = key(tiny, scheduler=mlfq)
    cl.run_workload(tiny, small_workload(num_requests=3), scheduler=mlfq, **LIMITS)
    assert key(tiny, scheduler=mlfq) == before


def test_cache_files_round_trip_nan_and_infinity(tmp_path):
    summary = {"ttft_mean": 0.25, "tpot_mean": math.nan, "rate": math.inf, "n": 3.0}
    path = tmp_path / "deep" / "k.json"
    experiment._write_summary(path, summary)
    text = path.read_text()
    assert list(json.loads(text)) == list(summary)  # summary order, not sorted
    assert "NaN" not in text
    back = experiment._read_summary(path)
    assert list(back) == list(summary)
    assert back["ttft_mean"] == 0.25 and back["rate"] == math.inf and math.isnan(back["tpot_mean"])
    path.write_text('{"ttft_mean": 0.2')  # a torn write from an older version: recompute
    assert experiment._read_summary(path) is None
    assert experiment._read_summary(tmp_path / "missing.json") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_label_names_policies():
    assert experiment.label("sjf") == "sjf"
    assert experiment.label(SJFScheduler) == "sjf"
    assert experiment.label(SJFScheduler()) == "sjf"
    assert experiment.label(my_fcfs) == "my_fcfs"
    assert experiment.label(cl.schedulers.FunctionScheduler(my_fcfs)) == "my_fcfs"


def test_comparisons_combine_with_or(tiny):
    wl = cl.workloads.burst(4, seed=0)
    first = cl.compare(tiny, wl, ["fcfs"], progress=False)
    second = cl.compare(tiny, wl, ["sjf"], progress=False)
    both = first | second
    assert list(both.summary.index) == ["fcfs", "sjf"]
    with pytest.raises(ValueError, match="both comparisons have runs named \\['fcfs'\\]"):
        first | first
