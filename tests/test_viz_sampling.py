"""Sampling pictures: plot_token_distribution, Trace(tokens=True) + plot_entropy, token_html."""

from __future__ import annotations

import math
import re

import cortexlab as cl

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

SP = cl.SamplingParams
PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def traced(tiny):
    """Two requests, one sampled with top-k/top-p and logprobs, one greedy, tokens recorded."""
    engine = cl.Engine(tiny)
    trace = cl.Trace(tokens=True)
    params = [
        SP(max_tokens=6, temperature=1.0, top_k=10, top_p=0.9, seed=3, logprobs=3, ignore_eos=True),
        SP(max_tokens=4, ignore_eos=True, logprobs=2),
    ]
    with engine.hooks(trace.hooks):
        results = engine.generate(PROMPTS, params)
    return trace, results


# -- plot_token_distribution ---------------------------------------------------------------
LOGITS = np.log(np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02]))


def _gid(artists, gid):
    return [a for a in artists if a.get_gid() == gid]


def test_token_distribution_bars_labels_and_cumulative_line():
    params = SP(temperature=1.0, top_k=5, top_p=0.6)
    ax = cl.viz.plot_token_distribution(LOGITS, params, top=8)
    raw, final = _gid(ax.patches, "raw"), _gid(ax.patches, "final")
    assert len(raw) == len(final) == 8
    np.testing.assert_allclose([p.get_height() for p in raw], np.exp(LOGITS), rtol=1e-6)
    heights = [p.get_height() for p in final]
    assert heights[3:] == [0.0] * 5 and sum(heights) == pytest.approx(1.0)
    grey = matplotlib.colors.to_rgba(cl.viz.sampling.REMOVED_COLOR)
    assert [p.get_facecolor() == grey for p in raw] == [False] * 3 + [True] * 5
    labels = [t.get_text() for t in _gid(ax.texts, "removed_by")]
    assert labels == ["top_p", "top_p", "top_k", "top_k", "top_k"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(8)]
    [twin] = [a for a in ax.figure.axes if a is not ax]
    [line] = _gid(twin.lines, "cumulative")
    # top-p saw top-k's output: the five kept tokens, renormalised
    top5 = np.array([0.30, 0.22, 0.16, 0.12, 0.08])
    np.testing.assert_allclose(line.get_ydata()[:5], np.cumsum(top5 / top5.sum()), rtol=1e-6)
    [threshold] = _gid(twin.lines, "top_p")
    assert threshold.get_ydata()[0] == 0.6
    assert "top_k 5" in ax.get_title() and "top_p 3" in ax.get_title()


def test_token_distribution_from_a_table_and_token_text(tiny):
    params = SP(temperature=2.0, top_p=0.5, order="llama.cpp")
    table = cl.sampling.explain(LOGITS, params, stages=True, tokenizer=tiny.tokenizer)
    fig, ax = plt.subplots()
    assert cl.viz.plot_token_distribution(table, ax=ax) is ax
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [cl.viz.token_label(tiny.tokenizer.decode([i])) for i in range(8)]
    assert cl.viz.token_label(" a\nb") == "␣a\\nb"
    # No top-p line without top-p; cumulative=False draws no twin axes at all.
    ax = cl.viz.plot_token_distribution(LOGITS, SP(temperature=1.0, min_p=0.3))
    assert not any(_gid(a.lines, "top_p") for a in ax.figure.axes)
    ax = cl.viz.plot_token_distribution(LOGITS, SP(temperature=1.0), cumulative=False)
    assert ax.figure.axes == [ax]
    with pytest.raises(ValueError, match="needs params"):
        cl.viz.plot_token_distribution(LOGITS)


# -- Trace(tokens=True) and plot_entropy ---------------------------------------------------
def test_trace_records_tokens_only_when_asked(traced):
    trace, results = traced
    assert "sampler.distribution" not in cl.Trace().hooks
    with pytest.raises(ValueError, match="Trace\\(tokens=True\\)"):
        _ = cl.Trace().tokens
    tokens = trace.tokens
    assert len(tokens) == sum(len(r.token_ids) for r in results)
    for result in results:
        rows = tokens[tokens["request_id"] == result.request_id].sort_values("position")
        assert rows["token_id"].tolist() == result.token_ids
        assert rows["position"].tolist() == list(range(len(result.token_ids)))
        # rank and logprob agree with the Result's logprobs (same final distribution)
        assert rows["rank"].tolist() == [e["rank"] for e in result.logprobs]
        np.testing.assert_allclose(
            rows["logprob"], [e["logprob"] for e in result.logprobs], rtol=1e-5
        )
        assert rows["text"].tolist() == [e["token"] for e in result.logprobs]
    np.testing.assert_allclose(tokens["prob"], np.exp(tokens["logprob"]))
    sampled = tokens[tokens["request_id"] == results[0].request_id]
    assert (sampled["kept_top_k"] == 10).all() and (sampled["kept_top_p"] <= 10).all()
    assert (sampled["entropy"] <= math.log(10) + 1e-6).all()
    greedy = tokens[tokens["request_id"] == results[1].request_id]
    assert greedy["kept_top_k"].isna().all() and (greedy["rank"] == 1).all()


def test_a_row_reports_only_its_own_stages_whatever_shares_its_batch(tiny):
    # Both rows are sampled with the same order: one group running top-k for the first only.
    params = [
        SP(max_tokens=3, temperature=1.0, top_k=5, seed=1, ignore_eos=True),
        SP(max_tokens=3, temperature=0.7, seed=1, ignore_eos=True),
    ]
    together, alone = cl.Trace(tokens=True), cl.Trace(tokens=True)
    engine = cl.Engine(tiny)
    with engine.hooks(together.hooks):
        both = engine.generate(PROMPTS, params)
    with engine.hooks(alone.hooks):
        [second] = engine.generate(PROMPTS[1:], params[1:])
    rows = together.tokens.set_index("request_id")
    assert (rows.loc[both[0].request_id, "kept_top_k"] == 5).all()
    assert rows.loc[both[1].request_id, "kept_top_k"].isna().all()
    assert (rows.loc[both[1].request_id, "kept_temperature"] == tiny.vocab_size).all()
    assert second.token_ids == both[1].token_ids
    assert "kept_top_k" not in alone.tokens.columns


def test_plot_entropy_one_line_per_request(traced):
    trace, results = traced
    ax = cl.viz.plot_entropy(trace)
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # lines + surprise dots
    colors = cl.viz.request_colors(trace)
    tokens = trace.tokens
    for line, result in zip(ax.lines, results, strict=True):
        rows = tokens[tokens["request_id"] == result.request_id]
        np.testing.assert_allclose(line.get_ydata(), rows["entropy"])
        assert matplotlib.colors.to_rgb(line.get_color()) == colors[result.request_id]
    ax = cl.viz.plot_entropy(trace.tokens, x="step", request_ids=[results[0].request_id])
    assert len(ax.lines) == 1 and ax.get_xlabel() == "engine step"
    with pytest.raises(ValueError, match="Trace\\(tokens=True\\)"):
        cl.viz.plot_entropy(pd.DataFrame())


# -- token_html --------------------------------------------------------------------------
def test_token_html_escapes_and_has_one_span_per_token():
    entries = [
        {"token": "<script>", "logprob": -0.1, "rank": 1, "top_logprobs": []},
        {
            "token": ' "a&b"',
            "logprob": math.log(0.25),
            "rank": 2,
            "top_logprobs": [{"token": "<i>", "logprob": math.log(0.5)}],
        },
    ]
    html = cl.viz.token_html(entries).html
    assert html.count("<span") == 2 == len(cl.viz.token_html(entries))
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&quot;a&amp;b&quot;" in html
    assert 'title="p = 0.250, rank 2\n&lt;i&gt;  0.500"' in html


def test_token_html_from_a_result_and_from_a_trace(traced, tiny):
    trace, results = traced
    from_result = cl.viz.token_html(results[0])
    assert from_result._repr_html_().count("<span") == len(results[0].token_ids)
    from_trace = cl.viz.token_html(
        trace, request_id=results[0].request_id, tokenizer=tiny.tokenizer
    )
    assert [t["text"] for t in from_trace.tokens] == [t["text"] for t in from_result.tokens]
    np.testing.assert_allclose(
        [t["prob"] for t in from_trace.tokens], [t["prob"] for t in from_result.tokens], rtol=1e-5
    )
    titles = re.findall(r'title="p = ([0-9.]+)', from_trace.html)
    assert len(titles) == len(results[0].token_ids)
    with pytest.raises(ValueError, match="no logprobs"):
        cl.viz.token_html(cl.Result("r", None, "", [], "length"))
    with pytest.raises(ValueError, match="no sampled tokens"):
        cl.viz.token_html(trace, request_id="nope")
