"""The simulated execution layer: cost model, simulated runner and clock, calibration."""

from __future__ import annotations

import json
import random

import cortexlab as cl
from cortexlab.runner import RowWork, group_rows, split_waves
from cortexlab.sim import BatchFeatures, CostModel, batch_features

import pandas as pd
import pytest

CM = CostModel(
    step_s=2e-3,
    forward_s=1e-3,
    prefill_token_s=1e-4,
    decode_row_s=5e-4,
    context_token_s=1e-6,
    padding_token_s=1e-4,
    sampled_row_s=2e-5,
    attention_pair_s=1e-7,
)


def _workload(n: int = 24, **options):
    options = {"num_requests": n, "seed": 0, **options}
    return cl.workloads.poisson(50.0, **options)


def _rows(lengths, offsets=None, needs=None):
    offsets = offsets or [0] * len(lengths)
    needs = needs or [True] * len(lengths)
    return [
        RowWork(list(range(64)), off, [1] * n, need)
        for n, off, need in zip(lengths, offsets, needs, strict=True)
    ]


def _formula(f: BatchFeatures) -> float:
    return (
        CM.step_s
        + CM.forward_s * f.num_forwards
        + CM.prefill_token_s * f.num_prefill_tokens
        + CM.decode_row_s * f.num_decode_rows
        + CM.context_token_s * f.num_context_tokens
        + CM.padding_token_s * f.num_padding_tokens
        + CM.sampled_row_s * f.num_sampled_rows
        + CM.attention_pair_s * f.num_attention_pairs
    )


# -- the cost model --------------------------------------------------------------------------
def test_features_of_hand_built_batches() -> None:
    f = batch_features(_rows([1, 1, 1], offsets=[10, 20, 30]))
    assert f == BatchFeatures(0, 3, 63, 0, 3, 1, 63)
    # Two prompts within the runner's padding limit share one padded forward.
    f = batch_features(_rows([10, 6, 1], offsets=[0, 4, 7], needs=[True, False, True]))
    # Attention pairs are causal: n*cached + n(n+1)/2 per row.
    assert f == BatchFeatures(16, 1, 28, 4, 2, 2, 55 + 45 + 8)
    # Too much padding: separate forwards, no padding.
    assert batch_features(_rows([40, 10])).num_padding_tokens == 0
    assert batch_features(_rows([40, 10])).num_forwards == 2
    # A long prompt runs in attention waves of 128 tokens: three forwards.
    assert batch_features(_rows([300])) == BatchFeatures(300, 0, 300, 0, 1, 3, 300 * 301 // 2)
    assert CM(batch_features(_rows([10, 6, 1]))) == pytest.approx(
        _formula(batch_features(_rows([10, 6, 1])))
    )
    assert CM(BatchFeatures(0, 0, 0, 0, 0, 0)) == 0.0


def test_padding_and_forwards_match_the_real_runner_layout() -> None:
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.choice([1, 1, rng.randint(2, 400)]) for _ in range(rng.randint(1, 8))]
        rows = _rows(lengths)
        padding = forwards = 0
        for wave in split_waves(rows):
            pieces = [len(p.token_ids) for _, p in wave]
            for group in group_rows(pieces):
                forwards += 1
                padding += max(pieces[j] for j in group) * len(group) - sum(
                    pieces[j] for j in group
                )
        f = batch_features(rows)
        assert (f.num_padding_tokens, f.num_forwards) == (padding, forwards), lengths


def test_cost_model_refuses_bad_coefficients() -> None:
    for bad in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(
            ValueError, match=r"CostModel.decode_row_s must be a finite number >= 0"
        ):
            CostModel(decode_row_s=bad)


# -- the simulated engine -------------------------------------------------------------------
def test_simulated_run_finishes_every_request_with_its_output_length(tiny) -> None:
    wl = _workload()
    run = cl.run_workload(tiny, wl, backend="sim", cost_model=CM)
    assert run.error is None and run.config["clock"] == "simulated"
    df = run.trace.requests.sort_values("request_id")
    assert (df.finish_reason == "length").all()
    assert df.num_output_tokens.tolist() == [r.output_len for r in wl]
    token = cl.sim.placeholder_token(tiny)
    assert all(set(ids) == {token} for ids in run.trace.output_token_ids.values())


def test_step_durations_are_the_cost_models(tiny) -> None:
    engine = cl.Engine(tiny, clock="simulated", cost_model=CM)
    assert isinstance(engine.runner, cl.sim.SimulatedRunner)
    trace = cl.Trace()
    with engine.hooks(trace.hooks):
        engine.submit(list(range(3, 23)), cl.SamplingParams(max_tokens=3, ignore_eos=True))
        engine.run_until_done()
    steps = trace.steps
    expected = [
        _formula(BatchFeatures(20, 0, 20, 0, 1, 1, 210)),  # the prompt
        _formula(BatchFeatures(0, 1, 21, 0, 1, 1, 21)),  # two decodes
        _formula(BatchFeatures(0, 1, 22, 0, 1, 1, 22)),
    ]
    assert steps.duration.tolist() == pytest.approx(expected, rel=1e-12)
    assert (steps.end - steps.start).tolist() == pytest.approx(expected, rel=1e-12)
    assert engine.clock.now() == pytest.approx(sum(expected), rel=1e-12)


def test_simulated_runs_are_identical_and_do_not_depend_on_wall_time(tiny) -> None:
    wl = _workload(16)
    a = cl.run_workload(tiny, wl, backend="sim", cost_model=CM, scheduler="sjf")
    b = cl.run_workload(tiny, wl, backend="sim", cost_model=CM, scheduler="sjf")
    pd.testing.assert_frame_equal(a.trace.steps, b.trace.steps)
    pd.testing.assert_frame_equal(a.trace.requests, b.trace.requests)
    assert a.trace.token_times == b.trace.token_times
    # Twice the cost: every engine-clock duration doubles, whatever this machine's speed.
    slow = CostModel(**{k: 2 * v for k, v in CM.coefficients.items()})
    c = cl.run_workload(tiny, wl.with_rate(25.0), backend="sim", cost_model=slow, scheduler="sjf")
    d = cl.run_workload(tiny, wl.with_rate(50.0), backend="sim", cost_model=CM, scheduler="sjf")
    assert c.trace.requests.e2e.tolist() == pytest.approx(2 * d.trace.requests.e2e, rel=1e-9)


def test_compare_sim_runs_every_scheduler_and_allocator(tiny) -> None:
    wl = _workload(16)
    names = cl.schedulers.available()
    cmp = cl.compare(tiny, wl, names, backend="sim", cost_model=CM, progress=False)
    assert list(cmp.summary.index) == names
    assert (cmp.summary.num_finished == len(wl)).all()
    allocators = cl.compare_allocators(
        tiny, wl, backend="sim", cost_model=CM, num_blocks=256, progress=False
    )
    assert (allocators.summary.num_finished == len(wl)).all()


def test_prefix_caching_lowers_simulated_ttft(tiny) -> None:
    wl = cl.workloads.poisson(
        5.0, num_requests=12, prompt_len=16, output_len=4, system_prompt_len=256, seed=0
    )
    cmp = cl.compare_allocators(
        tiny, wl, ["paged", "prefix"], backend="sim", cost_model=CM, progress=False
    )
    summary = cmp.summary
    assert summary.loc["prefix", "ttft_p50"] < 0.5 * summary.loc["paged", "ttft_p50"]
    assert cmp["prefix"].trace.steps.num_prefill_tokens.sum() < (
        cmp["paged"].trace.steps.num_prefill_tokens.sum()
    )


def test_simulated_engine_holds_no_kv_memory(tiny) -> None:
    engine = cl.Engine(tiny, clock="simulated", cost_model=CM, num_blocks=100_000)
    assert engine.arena.nbytes == 0 and engine.arena.arrays == []
    [result] = engine.generate([[5, 6, 7]], cl.SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(result.token_ids) == 4
    assert engine.arena.nbytes == 0


def test_token_trace_records_the_placeholder(tiny) -> None:
    engine = cl.Engine(tiny, clock="simulated", cost_model=CM)
    trace = cl.Trace(tokens=True)
    with engine.hooks(trace.hooks):
        engine.generate([[5, 6, 7]], cl.SamplingParams(max_tokens=3, ignore_eos=True))
    assert trace.tokens.token_id.tolist() == [cl.sim.placeholder_token(tiny)] * 3


# -- bad input ------------------------------------------------------------------------------
def test_simulated_clock_needs_a_cost_model(tiny) -> None:
    with pytest.raises(ValueError, match=r"cl\.sim\.CostModel\.load\(path\).*cl\.sim\.calibrate"):
        cl.Engine(tiny, clock="simulated")
    with pytest.raises(ValueError, match="cost_model is only used with clock='simulated'"):
        cl.Engine(tiny, clock="measured", cost_model=CM)
    with pytest.raises(ValueError, match="cost_model must be a cl.sim.CostModel"):
        cl.Engine(tiny, clock="simulated", cost_model={"step_s": 1})
    with pytest.raises(ValueError, match="backend must be one of engine, sim"):
        cl.run_workload(tiny, _workload(2), backend="gpu")
    with pytest.raises(ValueError, match="backend='sim' runs on the simulated clock"):
        cl.run_workload(tiny, _workload(2), backend="sim", clock="wall", cost_model=CM)


def test_cost_model_files_round_trip_and_bad_ones_are_refused(tiny, tmp_path) -> None:
    mine = CostModel(**CM.coefficients, model=cl.sim.model_identity(tiny))
    path = mine.save(tmp_path / "cm.json")
    assert CostModel.load(path, tiny) == mine
    engine = cl.Engine(tiny, clock="simulated", cost_model=str(path))
    assert engine.runner.cost_model == mine

    other = dict(mine.model, name="SmolLM2-135M-Instruct", layers=30)
    (tmp_path / "other.json").write_text(json.dumps(mine.to_dict() | {"model": other}))
    with pytest.raises(ValueError, match="calibrated on model 'SmolLM2-135M-Instruct'.*layers"):
        CostModel.load(tmp_path / "other.json", tiny)
    with pytest.raises(ValueError, match="calibrated on model"):
        cl.Engine(tiny, clock="simulated", cost_model=tmp_path / "other.json")

    bad = {
        "garbage.json": "{not json",
        "list.json": "[1, 2]",
        "version.json": json.dumps(mine.to_dict() | {"version": 99}),
        "missing.json": json.dumps(mine.to_dict() | {"coefficients": {"step_s": 1.0}}),
        "negative.json": json.dumps(
            mine.to_dict() | {"coefficients": CM.coefficients | {"step_s": -1.0}}
        ),
    }
    messages = {
        "garbage.json": "is not valid JSON",
        "list.json": "is not a cortexlab cost model",
        "version.json": "format version 99",
        "missing.json": "coefficients must be exactly",
        "negative.json": "CostModel.step_s must be a finite number >= 0",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=messages[name]):
            CostModel.load(tmp_path / name, tiny)
    with pytest.raises(ValueError, match="cannot read cost model file"):
        CostModel.load(tmp_path / "absent.json")


# -- calibration ----------------------------------------------------------------------------
# Batch shapes as (cached tokens, new tokens) per row: decode, prefill and mixed steps.
GRID = [
    [(0, 1)],
    [(16, 1)] * 8,
    [(64, 1)] * 16,
    [(0, 32)],
    [(0, 96)],
    [(0, 24), (0, 20)],
    [(32, 1)] * 4 + [(0, 64)],
]


def test_calibrate_fits_the_real_runner(tiny, tmp_path) -> None:
    cm = cl.sim.calibrate(tiny, grid=GRID, repeats=2)
    assert all(v >= 0 for v in cm.coefficients.values())
    assert sum(cm.coefficients.values()) > 0
    assert cm.model == cl.sim.model_identity(tiny)
    assert cm.info["num_points"] == len(GRID)
    assert all(d > 0 for d in cm.info["durations"])
    assert CostModel.load(cm.save(tmp_path / "tiny.json"), tiny) == cm
    # How well it fits is a benchmark question (timings on a shared CPU are noisy); the
    # fit itself is checked exactly on synthetic durations below.


def test_fit_recovers_known_coefficients() -> None:
    shapes = [*GRID, [(0, 200)], [(100, 1)] * 3]
    features = [
        cl.sim.batch_features([RowWork(list(range(16)), c, [1] * n, True) for c, n in shape])
        for shape in shapes
    ]
    truth = CostModel(step_s=0.002, prefill_token_s=1e-4, decode_row_s=5e-4, context_token_s=2e-6)
    fitted = CostModel.fit(features, [truth(f) for f in features])
    for shape in shapes:
        rows = [RowWork(list(range(16)), c, [1] * n, True) for c, n in shape]
        assert fitted.predict(rows) == pytest.approx(truth.predict(rows), rel=1e-6)


def test_calibrate_refuses_bad_grids(tiny) -> None:
    for grid, match in (
        ([], "grid must be a non-empty list"),
        ([[]], r"grid\[0\] must be a non-empty list"),
        ([[(0, 0)]], r"grid\[0\]: each row must be \(cached, new\)"),
        ([[(0, 1)], [(2048, 8)]], r"grid\[1\].*<= 2048"),
    ):
        with pytest.raises(ValueError, match=match):
            cl.sim.calibrate(tiny, grid=grid)
    with pytest.raises(ValueError, match=r"repeats must be an int in \[1, 1000\]"):
        cl.sim.calibrate(tiny, grid=[[(0, 1)]], repeats=0)
