"""cl.viz plots and cl.report on a real tiny-random trace (with a preemption and an idle step)."""

from __future__ import annotations

import re

import cortexlab as cl

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

NUM_SLOTS = 48  # block_size 4 x num_blocks 12: too small for five requests at once


@pytest.fixture(scope="module")
def trace(tiny):
    """Five requests into a 48-slot arena: one is preempted, one queues, then an idle step."""
    engine = cl.Engine(tiny, block_size=4, num_blocks=12, clock="measured")
    trace = cl.Trace()
    prompts = [[1 + i] * (5 + 3 * i) for i in range(5)]
    with engine.hooks(trace.hooks):
        engine.generate(prompts, cl.SamplingParams(max_tokens=8, ignore_eos=True))
        engine.step()  # nothing left: an idle step with no batch columns
    steps = trace.steps
    assert steps["num_seqs"].isna().any(), "the fixture needs an idle step"
    assert steps["num_preempted"].fillna(0).sum() >= 1, "the fixture needs a preemption"
    return trace


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _preempted_ids(trace) -> list:
    return [r for cell in trace.steps["preempted_ids"].dropna() for r in cell]


def _rgb(color) -> tuple:
    return tuple(np.round(np.asarray(color, float).ravel()[:3], 6))


# -- colours ---------------------------------------------------------------------------
def test_request_colors_are_stable_and_follow_arrival_order(trace):
    ids = list(trace.requests.sort_values("arrival_time", kind="stable")["request_id"])
    colors = cl.viz.request_colors(trace)
    assert list(colors) == ids
    assert colors == cl.viz.request_colors(ids) == cl.viz.request_colors(trace.requests)
    assert len(set(colors.values())) == len(ids)  # neighbours never share a colour
    many = cl.viz.request_colors([f"r{i}" for i in range(45)])
    palette = len(cl.viz.REQUEST_PALETTE)
    assert many["r0"] == many[f"r{palette}"] and many["r0"] != many["r1"]


# -- Gantt -----------------------------------------------------------------------------
def test_request_spans_follow_the_steps(trace):
    spans = cl.viz.request_spans(trace)
    steps = trace.steps.set_index("step")
    assert set(spans["request_id"]) == set(trace.requests["request_id"])
    for rid in _preempted_ids(trace):
        [(start, end)] = spans.query("request_id == @rid and phase == 'preempted'")[
            ["start_step", "end_step"]
        ].itertuples(index=False)
        assert rid in steps.loc[start, "preempted_ids"]
        assert rid in steps.loc[end, "request_ids"]  # runs again (a recompute prefill)
        assert steps.loc[end, "is_prefill"][steps.loc[end, "request_ids"].index(rid)]
    # every scheduled (request, step) lands in exactly one prefill/decode span
    ran = spans[spans["phase"].isin(["prefill", "decode"])]
    covered = sorted(
        (r.request_id, k) for r in ran.itertuples() for k in range(r.start_step, r.end_step)
    )
    scheduled = sorted((rid, k) for k, ids in steps["request_ids"].dropna().items() for rid in ids)
    assert covered == scheduled
    assert (spans.query("phase == 'queued'")["end_step"] > 0).any()  # somebody queued


@pytest.mark.parametrize("x", ["time", "step"])
def test_gantt_has_a_row_per_request_and_the_preemption(trace, x):
    ax = cl.viz.plot_gantt(trace, x=x)
    gids = [c.get_gid() for c in ax.collections]
    order = list(cl.viz.request_colors(trace))
    assert {g.split(":", 1)[1] for g in gids} == {str(r) for r in order}
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(r) for r in order]
    for rid in _preempted_ids(trace):
        assert f"preempted:{rid}" in gids
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(cl.viz.PHASES)
    assert ax.get_xlabel() == ("step" if x == "step" else "time (s, engine clock)")
    if x == "step":  # the preempted span's extent in steps, centred on the step numbers
        rid = _preempted_ids(trace)[0]
        span = cl.viz.request_spans(trace).query("request_id == @rid and phase == 'preempted'")
        [collection] = [c for c in ax.collections if c.get_gid() == f"preempted:{rid}"]
        xs = collection.get_paths()[0].vertices[:, 0]
        assert xs.min() == span["start_step"].iloc[0] - 0.5
        assert xs.max() == span["end_step"].iloc[0] - 0.5


def test_gantt_time_spans_stay_inside_the_trace(trace):
    ax = cl.viz.plot_gantt(trace, x="time")
    steps = trace.steps
    for collection in ax.collections:
        xs = collection.get_paths()[0].vertices[:, 0]
        assert xs.min() >= trace.requests["arrival_time"].min() - 1e-12
        assert xs.max() <= steps["end"].max() + 1e-12


def test_gantt_accepts_dataframes(trace):
    ax = cl.viz.plot_gantt(trace.steps, x="step")  # no arrivals known: no queued spans
    assert not any(c.get_gid().startswith("queued:") for c in ax.collections)
    assert any(c.get_gid().startswith("preempted:") for c in ax.collections)
    ax = cl.viz.plot_gantt(trace.steps, requests=trace.requests, x="time")
    with_requests = sorted(c.get_gid() for c in ax.collections)
    assert with_requests == sorted(c.get_gid() for c in cl.viz.plot_gantt(trace).collections)


# -- per-step plots --------------------------------------------------------------------
def _rectangles(collection) -> np.ndarray:
    """(x centre, bottom, height) of each bar in a collection drawn by plot_batch_composition."""
    corners = np.array([p.vertices[:4] for p in collection.get_paths()])
    left_bottom, left_top, right_top = corners[:, 0], corners[:, 1], corners[:, 2]
    return np.c_[
        (left_bottom[:, 0] + right_top[:, 0]) / 2,
        left_bottom[:, 1],
        left_top[:, 1] - left_bottom[:, 1],
    ]


def test_batch_composition_by_phase_matches_the_steps(trace):
    steps = trace.steps
    ax = cl.viz.plot_batch_composition(trace)
    prefill, decode = (_rectangles(c) for c in ax.collections)
    assert [c.get_gid() for c in ax.collections] == ["prefill", "decode"]
    np.testing.assert_array_equal(prefill[:, 0], steps["step"])
    np.testing.assert_array_equal(prefill[:, 2], steps["num_prefill_tokens"].fillna(0))
    # each decoding sequence adds exactly one token, stacked on the prefill tokens
    np.testing.assert_array_equal(decode[:, 2], steps["num_decode_seqs"].fillna(0))
    np.testing.assert_array_equal(decode[:, 1], steps["num_prefill_tokens"].fillna(0))
    assert ax.get_ylabel() == "tokens in batch"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "prefill tokens",
        "decode tokens",
    ]


@pytest.mark.parametrize("source", ["trace", "steps"])
def test_batch_composition_by_request_uses_request_colours(trace, source):
    steps = trace.steps.set_index("step")
    colors = cl.viz.request_colors(trace)
    ax = cl.viz.plot_batch_composition(trace if source == "trace" else trace.steps, by="request")
    per_step: dict = {}
    for collection in ax.collections:
        _, rid_text, phase = collection.get_gid().split(":")
        [rid] = [r for r in colors if str(r) == rid_text]
        assert _rgb(collection.get_facecolor()) == _rgb(colors[rid])
        assert bool(collection.get_hatch()) == (phase == "prefill")
        for x, bottom, height in _rectangles(collection):
            k = int(x)
            per_step[k] = per_step.get(k, 0) + height
            position = steps.loc[k, "request_ids"].index(rid)
            assert steps.loc[k, "is_prefill"][position] == (phase == "prefill")
            assert height == steps.loc[k, "num_new_tokens"][position]
            assert bottom == sum(steps.loc[k, "num_new_tokens"][:position])  # batch order
    assert per_step == steps["num_batched_tokens"].dropna().to_dict()


def test_batch_composition_legend_stays_short_with_many_requests():
    steps = pd.DataFrame(
        {
            "step": [0, 1],
            "request_ids": [list(range(30)), list(range(30))],
            "num_new_tokens": [[5] * 30, [1] * 30],
            "is_prefill": [[True] * 30, [False] * 30],
        }
    )
    ax = cl.viz.plot_batch_composition(steps, by="request", max_legend=5)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == 6 and texts[-1] == "+25 more"
    assert len({c.get_gid().split(":")[1] for c in ax.collections}) == 30


def test_cache_occupancy_stacks_fill_the_arena(trace):
    steps = trace.steps
    ax = cl.viz.plot_cache_occupancy(trace)
    layers = [c.get_paths()[0].vertices for c in ax.collections]
    # holding, reserved, internal, free; cached and external when the engine reports them
    assert len(layers) == 4 + ("kv_cached_slots" in steps) + ("kv_external_slots" in steps)
    n = len(steps)
    bottom, top = layers[0][1 : n + 1, 1], layers[-1][n + 2 : 2 * n + 2, 1]
    np.testing.assert_array_equal(bottom, 0)
    np.testing.assert_array_equal(top, NUM_SLOTS)
    [twin] = [a for a in ax.figure.axes if a is not ax]
    np.testing.assert_allclose(twin.lines[0].get_ydata(), steps["kv_utilization"])
    assert str(NUM_SLOTS) in ax.get_title()
    ax = cl.viz.plot_cache_occupancy(trace.steps, utilization=False, x="time")
    assert len(ax.figure.axes) == 1 and "time" in ax.get_xlabel()


def test_queue_lines_follow_the_counts(trace):
    steps = trace.steps
    ax = cl.viz.plot_queue(trace.steps)
    waiting, running, preemptions = ax.lines
    np.testing.assert_array_equal(waiting.get_ydata(), steps["num_waiting"])
    np.testing.assert_array_equal(running.get_ydata(), steps["num_running"])
    assert len(preemptions.get_xdata()) == int((steps["num_preempted"].fillna(0) > 0).sum())


# -- latencies and comparisons ---------------------------------------------------------
@pytest.mark.parametrize("source", ["trace", "requests"])
def test_latency_cdf_reaches_one_at_the_max(trace, source):
    data = trace if source == "trace" else trace.requests
    ax = cl.viz.plot_latency_cdf(data, metric="e2e")
    [line] = [ln for ln in ax.lines if ln.get_gid() == "cdf:None"]
    xs, ys = line.get_xdata(), line.get_ydata()
    assert ys[0] == 0 and ys[-1] == 1.0 and xs[-1] == trace.requests["e2e"].max()
    assert np.all(np.diff(ys) >= 0)
    assert ax.get_xlabel() == "end-to-end latency (s)"


def test_latency_cdf_one_line_per_policy(trace):
    ax = cl.viz.plot_latency_cdf({"a": trace, "b": trace.requests.iloc[:3]}, percentiles=(50,))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a (n=5)", "b (n=3)", "p50"]
    with pytest.raises(ValueError, match="no_such_metric"):
        cl.viz.plot_latency_cdf(trace, metric="no_such_metric")


def test_goodput_vs_load_one_sorted_line_per_hue():
    df = pd.DataFrame(
        {
            "scheduler": ["fcfs", "sjf", "fcfs", "sjf", "fcfs", "sjf"],
            "rate": [4, 4, 1, 1, 2, 2],
            "goodput_rps": [3.0, 3.5, 1.0, 1.0, 1.9, 2.0],
        }
    )
    ax = cl.viz.plot_goodput_vs_load(df)
    assert [ln.get_label() for ln in ax.lines] == ["fcfs", "sjf"]
    assert list(ax.lines[0].get_xdata()) == [1, 2, 4]
    assert list(ax.lines[1].get_ydata()) == [1.0, 2.0, 3.5]
    assert ax.get_xlabel() == "arrival rate (req/s)" and ax.get_ylabel() == "goodput (req/s)"


def test_goodput_vs_load_draws_seeds_as_their_mean_and_range():
    df = pd.DataFrame(
        {
            "scheduler": ["fcfs"] * 4 + ["sjf"] * 2,
            "rate": [2, 1, 2, 1, 1, 2],
            "seed": [0, 0, 1, 1, 0, 0],
            "goodput_share": [0.5, 1.0, 0.7, 0.8, 1.0, 0.9],
        }
    )
    ax = cl.viz.plot_goodput_vs_load(df, y="goodput_share")
    assert list(ax.lines[0].get_xdata()) == [1, 2]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.9, 0.6])
    assert list(ax.lines[1].get_ydata()) == pytest.approx([1.0, 0.9])
    [band] = ax.collections  # fcfs has two seeds per rate; sjf one, so no band
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (low, high) == pytest.approx((0.5, 1.0))


def test_goodput_vs_load_plots_a_real_sweep_with_its_defaults(tiny):
    workload = cl.workloads.poisson(4.0, num_requests=3, prompt_len=8, output_len=2, seed=0)
    loads = cl.sweep(
        tiny,
        workload,
        schedulers=["fcfs", "sjf"],
        rates=[2.0, 4.0],
        slo={"ttft": 10.0},
        cache_dir=None,
        progress=False,
    )
    ax = cl.viz.plot_goodput_vs_load(loads)
    assert [ln.get_label() for ln in ax.lines] == ["fcfs", "sjf"]
    share = cl.viz.plot_goodput_vs_load(loads, y="goodput_share")
    assert share.get_ylabel() == "share of requests within the SLO (fraction)"
    assert list(share.lines[0].get_ydata()) == [1.0, 1.0]


def test_metric_bars_grouped_by_policy():
    summary = pd.DataFrame(
        {"ttft_p50": [0.1, 0.08], "ttft_p99": [0.5, 0.3], "extra": [1, 2]},
        index=pd.Index(["fcfs", "sjf"], name="scheduler"),
    )
    ax = cl.viz.plot_metric_bars(summary)
    assert len(ax.containers) == 2
    assert [p.get_height() for p in ax.containers[1]] == [0.5, 0.3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fcfs", "sjf"]
    assert ax.get_ylabel() == "value (s)"


def test_every_plot_draws_into_a_given_axes(trace):
    summary = pd.DataFrame({"ttft_p50": [1.0], "ttft_p99": [2.0]}, index=["fcfs"])
    sweep = pd.DataFrame({"scheduler": ["fcfs"], "rate": [1.0], "goodput_rps": [1.0]})
    calls = [
        lambda ax: cl.viz.plot_gantt(trace, ax=ax),
        lambda ax: cl.viz.plot_batch_composition(trace, ax=ax, by="request"),
        lambda ax: cl.viz.plot_cache_occupancy(trace, ax=ax),
        lambda ax: cl.viz.plot_latency_cdf(trace, ax=ax),
        lambda ax: cl.viz.plot_queue(trace, ax=ax),
        lambda ax: cl.viz.plot_goodput_vs_load(sweep, ax=ax),
        lambda ax: cl.viz.plot_metric_bars(summary, ax=ax),
    ]
    fig, axes = plt.subplots(1, len(calls))
    for call, ax in zip(calls, axes, strict=True):
        assert call(ax) is ax
        assert ax.has_data() and ax.get_title()
    assert plt.get_fignums() == [fig.number]


def test_gantt_and_bars_agree_on_request_colours(trace):
    gantt = cl.viz.plot_gantt(trace)
    bars = cl.viz.plot_batch_composition(trace, by="request")
    for rid, color in cl.viz.request_colors(trace).items():
        [decode] = [c for c in gantt.collections if c.get_gid() == f"decode:{rid}"]
        [bar] = [c for c in bars.collections if c.get_gid() == f"request:{rid}:decode"]
        assert _rgb(decode.get_facecolor()) == _rgb(color) == _rgb(bar.get_facecolor())


def test_empty_trace_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        cl.viz.plot_queue(cl.Trace())
    with pytest.raises(TypeError, match="Trace"):
        cl.viz.plot_queue([1, 2, 3])


# -- report ----------------------------------------------------------------------------
def test_report_is_one_self_contained_file(trace, tmp_path):
    summary = pd.DataFrame(
        {"ttft_p50": [0.01234, 0.5], "goodput": [12.5, 3.25]}, index=pd.Index(["fcfs", "sjf"])
    )
    figures = {
        "gantt <all>": cl.viz.plot_gantt(trace).figure,
        "queue": cl.viz.plot_queue(trace),  # an Axes works too
    }
    path = cl.report.write_report(
        tmp_path / "out" / "report.html",
        title="FCFS vs SJF",
        summary=summary,
        figures=figures,
        notes={"model": "tiny-random", "slo_s": 0.25},
        tables={"requests": trace.requests},
    )
    text = path.read_text(encoding="utf-8")
    assert path.exists() and text.startswith("<!DOCTYPE html>")
    for value in ["0.01234", "0.5", "12.5", "3.25", "fcfs", "sjf", "tiny-random", "0.25"]:
        assert f">{value}<" in text
    assert text.count('<img src="data:image/png;base64,') == len(figures)
    assert "gantt &lt;all&gt;" in text and "<all>" not in text
    assert not re.search(r"""(href|src)\s*=\s*["']?(https?:|//)|url\(|@import""", text)


def test_report_is_deterministic(tmp_path):
    fig = plt.figure(figsize=(2, 1))
    png = cl.report.figure_to_png_bytes(fig)
    assert png.startswith(b"\x89PNG")
    kwargs = dict(title="t", summary=pd.DataFrame({"x": [1.5]}), figures={"f": png}, notes="a\n\nb")
    one = cl.report.write_report(tmp_path / "1.html", **kwargs).read_bytes()
    two = cl.report.write_report(tmp_path / "2.html", **kwargs).read_bytes()
    assert one == two and b"<p>a</p>" in one


def test_spans_from_events_cover_a_preemption_in_an_empty_step():
    """A step whose batch is empty has no batch columns; its preemption still shows."""
    nan = float("nan")
    steps = pd.DataFrame(
        {
            "step": [0, 1, 2],
            "start": [0.0, 1.0, 2.0],
            "end": [1.0, 2.0, 3.0],
            "request_ids": [["a", "b"], nan, ["a"]],
            "num_new_tokens": [[3, 2], nan, [1]],
            "is_prefill": [[True, True], nan, [False]],
            "preempted_ids": [[], nan, []],
        }
    )
    events = pd.DataFrame(
        [(0.0, 0, "request.arrived", "a"), (0.0, 0, "request.arrived", "b")]
        + [(1.0, 1, "request.preempted", "b"), (3.0, 2, "request.finished", "a")],
        columns=["time", "step", "event", "request_id"],
    )
    requests = pd.DataFrame({"request_id": ["a", "b"], "arrival_time": [0.0, 0.0]})
    fake = type("FakeTrace", (), {"steps": steps, "requests": requests, "request_events": events})
    spans = cl.viz.request_spans(fake).query("end_step > start_step")
    assert sorted(map(tuple, spans.to_numpy().tolist())) == [
        ("a", "decode", 2, 3),
        ("a", "prefill", 0, 1),
        ("b", "preempted", 1, 3),
        ("b", "prefill", 0, 1),
    ]
    ax = cl.viz.plot_gantt(fake, x="time")
    [preempted] = [c for c in ax.collections if c.get_gid() == "preempted:b"]
    assert preempted.get_paths()[0].vertices[:, 0].max() == 3.0  # waits to the trace's end
