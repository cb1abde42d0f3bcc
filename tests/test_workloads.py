"""Workloads: seeded generation, distributions, arrivals, prompts, replay, and bad input named."""

from __future__ import annotations

import importlib.resources

import cortexlab as cl
from cortexlab.request import FinishReason
from cortexlab.workloads import (
    AllAtOnce,
    Constant,
    Empirical,
    Fixed,
    Gamma,
    LogNormal,
    Poisson,
    Uniform,
    Zipf,
)

import numpy as np
import pandas as pd
import pytest
from conftest import needs_smollm

wl = cl.workloads


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaps_cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


# -- reproducibility ----------------------------------------------------------------------
def test_same_seed_same_workload_and_different_seed_differs(tiny):
    options = dict(num_requests=20, tenants={"a": 1, "b": 1}, priorities=[0, 1])
    a, b = wl.poisson(2.0, seed=7, **options), wl.poisson(2.0, seed=7, **options)
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame())
    assert a.materialize(tiny) == b.materialize(tiny)
    c = wl.poisson(2.0, seed=8, **options)
    assert not a.to_frame().equals(c.to_frame())
    assert [r.prompt_token_ids for r in a.materialize(tiny)] != [
        r.prompt_token_ids for r in c.materialize(tiny)
    ]


def test_each_aspect_has_its_own_random_stream():
    plain = wl.gamma(3.0, 2.0, num_requests=30, seed=1).to_frame()
    tagged = wl.gamma(3.0, 2.0, num_requests=30, seed=1, tenants={"x": 1, "y": 2}).to_frame()
    cols = ["arrival_time", "prompt_len", "output_len", "priority"]
    pd.testing.assert_frame_equal(plain[cols], tagged[cols])


def test_defaults_are_small_and_documented():
    frame = wl.burst().to_frame()
    assert len(frame) == wl.DEFAULT_NUM_REQUESTS == 32
    assert frame.prompt_len.between(8, 512).all() and frame.output_len.between(4, 128).all()
    assert (frame.arrival_time == 0).all() and (frame.tenant == "default").all()


# -- length distributions -----------------------------------------------------------------
def test_length_distributions_bounds_and_means():
    assert (Fixed(5).sample(rng(), 10) == 5).all()
    u = Uniform(3, 7).sample(rng(), 5000)
    assert u.min() == 3 and u.max() == 7 and abs(u.mean() - 5) < 0.1
    ln = LogNormal(64, 0.5).sample(rng(), 5000)
    assert abs(np.median(ln) - 64) < 3
    clipped = LogNormal(64, 2.0, low=10, high=100).sample(rng(), 5000)
    assert clipped.min() == 10 and clipped.max() == 100
    z = Zipf(1.2, low=5, high=50).sample(rng(), 5000)
    assert z.min() == 5 and z.max() <= 50
    counts = np.bincount(z)
    assert counts[5] > counts[6] > counts[8] > counts[20]  # heavier at the low end
    e = Empirical([10, 20, 30], weights=[0, 1, 3]).sample(rng(), 4000)
    assert set(e) == {20, 30} and abs((e == 30).mean() - 0.75) < 0.03
    for dist in (Fixed(5), Uniform(3, 7), LogNormal(64), Zipf(1.0), Empirical([4])):
        assert dist.sample(rng(), 7).dtype == np.int64


def test_int_means_fixed_and_custom_distributions_plug_in():
    class Twice:
        def sample(self, rng, n):
            return np.full(n, 2)

    frame = wl.constant(1.0, num_requests=4, prompt_len=12, output_len=Twice()).to_frame()
    assert (frame.prompt_len == 12).all() and (frame.output_len == 2).all()


# -- arrival processes --------------------------------------------------------------------
def test_arrival_processes_rates_and_burstiness():
    n = 4000
    for process in (Poisson(5.0), Gamma(5.0, 3.0), Constant(5.0), AllAtOnce()):
        times = process.arrival_times(rng(), n)
        assert times.shape == (n,) and times[0] == 0 and (np.diff(times) >= 0).all()
    assert abs((n - 1) / Poisson(5.0).arrival_times(rng(), n)[-1] - 5.0) < 0.3
    assert abs((n - 1) / Gamma(5.0, 3.0).arrival_times(rng(), n)[-1] - 5.0) < 0.8
    np.testing.assert_allclose(np.diff(Constant(4.0).arrival_times(rng(), 5)), 0.25)
    assert (AllAtOnce().arrival_times(rng(), 5) == 0).all()
    poisson_cv = gaps_cv(Poisson(5.0).arrival_times(rng(), n))
    bursty_cv = gaps_cv(Gamma(5.0, 3.0).arrival_times(rng(), n))
    regular_cv = gaps_cv(Gamma(5.0, 0.3).arrival_times(rng(), n))
    assert abs(poisson_cv - 1) < 0.1 and bursty_cv > 2.5 and abs(regular_cv - 0.3) < 0.05


def test_with_rate_rescales_arrivals_and_keeps_the_rest():
    slow = wl.poisson(2.0, num_requests=50, seed=3)
    fast = slow.with_rate(8.0)
    np.testing.assert_allclose(
        fast.to_frame().arrival_time,
        wl.poisson(8.0, num_requests=50, seed=3).to_frame().arrival_time,
    )
    cols = ["prompt_len", "output_len", "tenant", "priority"]
    pd.testing.assert_frame_equal(slow.to_frame()[cols], fast.to_frame()[cols])
    assert fast.arrivals == Poisson(8.0)
    with pytest.raises(ValueError, match="arrives at once"):
        wl.burst(4).with_rate(2.0)


# -- tenants and priorities ---------------------------------------------------------------
def test_tenant_and_priority_weights_respected():
    frame = wl.poisson(
        10.0, num_requests=4000, tenants={"gold": 3, "free": 1}, priorities={0: 1, 5: 1}
    ).to_frame()
    assert abs((frame.tenant == "gold").mean() - 0.75) < 0.03
    assert set(frame.priority) == {0, 5} and abs((frame.priority == 5).mean() - 0.5) < 0.03
    listed = wl.burst(300, tenants=["a", "b", "c"]).to_frame()
    assert set(listed.tenant) == {"a", "b", "c"}


# -- materialize --------------------------------------------------------------------------
def test_materialize_exact_lengths_natural_text_and_params(tiny):
    work = wl.poisson(4.0, num_requests=40, tenants={"a": 1, "b": 1}, priorities=[0, 2], seed=2)
    base = cl.SamplingParams(temperature=0.7, stop=["."], stop_token_ids=[1])
    bound = work.materialize(tiny, params=base)
    corpus = wl.corpus_text() * 2  # prompts wrap from the corpus's end to its start
    assert len({tuple(b.prompt_token_ids[:8]) for b in bound}) == len(bound)  # distinct starts
    for request, b in zip(work, bound, strict=True):
        assert len(b.prompt_token_ids) == request.prompt_len
        assert b.arrival_time == request.arrival_time
        start = corpus.find(b.prompt_text)
        assert start >= 0 and (start == 0 or corpus[start - 1].isspace())  # cut at a word
        assert not b.prompt_text[0].isspace()
        p = b.params
        assert (p.max_tokens, p.ignore_eos, p.stop, p.stop_token_ids) == (
            request.output_len,
            True,
            (),
            (),
        )
        assert (p.tenant, p.priority, p.temperature) == (request.tenant, request.priority, 0.7)
    assert len({b.params.seed for b in bound}) == len(bound)


def test_shared_system_prompt_prefix(tiny):
    work = wl.poisson(4.0, num_requests=10, prompt_len=Uniform(5, 40), system_prompt_len=64)
    frame = work.to_frame()
    assert frame.prompt_len.between(64 + 5, 64 + 40).all() and work.system_prompt_len == 64
    bound = work.materialize(tiny)
    prefix = bound[0].prompt_token_ids[:64]
    assert all(b.prompt_token_ids[:64] == prefix for b in bound)
    assert len({b.prompt_token_ids[64] for b in bound}) > 1  # shared: exactly 64 tokens
    assert bound[0].prompt_text.startswith("Chapter 1\n\nSir Walter Elliot")
    assert all(len(b.prompt_token_ids) == r.prompt_len for b, r in zip(bound, work, strict=True))


def test_prompt_longer_than_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match=r"request 0: prompt_len 2100 .* context of 2048"):
        wl.burst(2, prompt_len=2100, output_len=4).materialize(tiny)
    with pytest.raises(ValueError, match="exceeds tiny-random's context"):
        wl.burst(2, prompt_len=2000, output_len=100).materialize(tiny)


@needs_smollm
def test_materialize_with_the_real_tokenizer(smollm):
    corpus = wl.corpus_text() * 2
    plain = wl.burst(8, seed=5)
    for request, b in zip(plain, plain.materialize(smollm), strict=True):
        assert len(b.prompt_token_ids) == request.prompt_len
        start = corpus.find(b.prompt_text)  # English from the corpus, cut at a word
        assert start > 0 and corpus[start - 1].isspace() and not b.prompt_text[0].isspace()
    shared = wl.burst(8, system_prompt_len=20, seed=5)
    system_text = smollm.tokenizer.decode(shared.materialize(smollm)[0].prompt_token_ids[:20])
    for request, b in zip(shared, shared.materialize(smollm), strict=True):
        assert len(b.prompt_token_ids) == request.prompt_len
        own = b.prompt_text.removeprefix(system_text)
        assert own != b.prompt_text and own[0] == " " and own[1:] in corpus


def test_engine_generates_exactly_output_len(tiny):
    work = wl.poisson(8.0, num_requests=6, prompt_len=Uniform(8, 48), output_len=Uniform(2, 12))
    engine = cl.Engine(tiny)
    submitted = [engine.submit(b.prompt_token_ids, b.params) for b in work.materialize(tiny)]
    engine.run_until_done()
    for request, r in zip(submitted, work, strict=True):
        assert request.num_output_tokens == r.output_len
        assert request.finish_reason is FinishReason.LENGTH


# -- display ------------------------------------------------------------------------------
def test_frame_summary_and_html_are_stable():
    work = wl.gamma(2.0, 2.0, num_requests=12, tenants={"a": 1, "b": 1}, seed=4)
    frame = work.to_frame()
    assert list(frame.columns) == [
        "index",
        "arrival_time",
        "prompt_len",
        "output_len",
        "tenant",
        "priority",
    ]
    assert list(frame["index"]) == list(range(12)) and frame.arrival_time.is_monotonic_increasing
    s = work.summary()
    assert s["num_requests"] == 12 and sum(s["tenants"].values()) == 12
    assert s["total_output_tokens"] == frame.output_len.sum()
    html = work._repr_html_()
    assert (
        html == wl.gamma(2.0, 2.0, num_requests=12, tenants={"a": 1, "b": 1}, seed=4)._repr_html_()
    )
    assert "0x" not in html and "Gamma(rate=2.0, cv=2.0)" in html and "4 more rows" in html
    assert "32 requests all at 0 s" in wl.burst()._repr_html_()
    with pytest.raises(ValueError, match="at least one"):
        wl.Workload([], name="empty")
    with pytest.raises(ValueError, match=r"request 0 needs prompt text or a prompt_len > system"):
        wl.Workload([wl.WorkloadRequest(0, 0.0, 8, 4)], name="short", system_prompt_len=8)
    assert len(work) == 12 and work[3].index == 3 and [r.index for r in work] == list(range(12))


# -- replay -------------------------------------------------------------------------------
def test_replay_from_dataframe_sorts_and_reads_every_prompt_kind(tiny):
    table = pd.DataFrame(
        {
            "arrival_time": [1.5, 0.0, 0.5],
            "prompt": ["Hello there", [5, 6, 7], "[1, 2, 3, 4]"],
            "output_len": [3, 4, 5],
            "tenant": ["a", "b", "a"],
            "priority": [1, 0, 2],
        }
    )
    work = wl.replay(table)
    assert [r.arrival_time for r in work] == [0.0, 0.5, 1.5]
    assert [r.prompt for r in work] == [(5, 6, 7), (1, 2, 3, 4), "Hello there"]
    assert work.to_frame().prompt_len.tolist()[:2] == [3, 4] and pd.isna(work[2].prompt_len)
    bound = work.materialize(tiny)
    assert bound[2].prompt_token_ids == tiny.tokenizer.encode("Hello there")
    assert bound[2].prompt_text == "Hello there" and bound[0].prompt_text is None
    assert [b.params.max_tokens for b in bound] == [4, 5, 3]
    assert [b.params.tenant for b in bound] == ["b", "a", "a"]


def test_replay_mixes_given_prompts_and_corpus_prompts(tiny):
    table = pd.DataFrame(
        {
            "arrival_time": [0.0, 0.1],
            "prompt": [None, "Hi"],
            "prompt_len": [6, None],
            "output_len": 1,
        }
    )
    bound = wl.replay(table).materialize(tiny)
    assert len(bound[0].prompt_token_ids) == 6 and bound[0].prompt_text in wl.corpus_text() * 2
    assert bound[1].prompt_token_ids == tiny.tokenizer.encode("Hi")


def test_replay_round_trips_through_csv(tmp_path, tiny):
    work = wl.gamma(3.0, 2.0, num_requests=15, tenants=["x", "y"], priorities=[0, 1], seed=9)
    path = tmp_path / "trace.csv"
    work.to_frame().to_csv(path, index=False)
    again = wl.replay(path, seed=9)
    pd.testing.assert_frame_equal(again.to_frame(), work.to_frame())
    assert again.materialize(tiny) == work.materialize(tiny)
    ids = wl.replay(
        pd.DataFrame(
            {"arrival_time": [0.0, 1.0], "prompt": [[7, 8, 9], "Hi"], "output_len": [2, 2]}
        )
    )
    ids.to_frame().to_csv(tmp_path / "ids.csv", index=False)
    again = wl.replay(tmp_path / "ids.csv")
    assert [r.prompt for r in again] == [(7, 8, 9), "Hi"]
    pd.testing.assert_frame_equal(again.to_frame(), ids.to_frame())


# -- bad input names the field ------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Fixed(0), r"Fixed\.value must be an int >= 1"),
        (lambda: Uniform(5, 2), r"Uniform\.high must be an int >= low \(5\)"),
        (lambda: Uniform(0, 2), r"Uniform\.low"),
        (lambda: LogNormal(-1), r"LogNormal\.median must be a finite float > 0"),
        (lambda: LogNormal(10, float("nan")), r"LogNormal\.sigma"),
        (lambda: LogNormal(10, high=0), r"LogNormal\.high"),
        (lambda: Zipf(0), r"Zipf\.a must be a finite float > 0"),
        (lambda: Zipf(1.0, low=10, high=5), r"Zipf\.high"),
        (lambda: Empirical([]), r"Empirical\.values must be a non-empty list"),
        (lambda: Empirical([1, 0]), r"Empirical\.values"),
        (lambda: Empirical([1, 2], weights=[1]), r"Empirical\.weights"),
        (lambda: Empirical([1, 2], weights=[0, 0]), r"Empirical\.weights"),
        (lambda: Poisson(0), r"Poisson\.rate must be a finite float > 0"),
        (lambda: Gamma(1.0, -1), r"Gamma\.cv"),
        (lambda: Constant(float("inf")), r"Constant\.rate"),
        (lambda: wl.poisson(-2.0), r"Poisson\.rate"),
        (lambda: wl.poisson(1.0, num_requests=0), r"workload\.num_requests must be an int >= 1"),
        (lambda: wl.poisson(1.0, seed=-1), r"workload\.seed"),
        (lambda: wl.poisson(1.0, prompt_len=0), r"workload\.prompt_len"),
        (lambda: wl.poisson(1.0, output_len="long"), r"workload\.output_len"),
        (lambda: wl.poisson(1.0, system_prompt_len=-4), r"workload\.system_prompt_len"),
        (lambda: wl.poisson(1.0, tenants={"a": -1}), r"workload\.tenants"),
        (lambda: wl.poisson(1.0, tenants={"": 1}), r"workload\.tenants"),
        (lambda: wl.poisson(1.0, tenants={}), r"workload\.tenants"),
        (lambda: wl.poisson(1.0, priorities={"high": 1}), r"workload\.priorities"),
        (lambda: wl.poisson(1.0, priorities=[1, 1]), r"workload\.priorities"),
        (lambda: wl.generate("poisson"), r"workload\.arrivals"),
        (lambda: wl.poisson(1.0).with_rate(0), r"with_rate\.rate"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_custom_distribution_output_is_rejected():
    class Broken:
        def sample(self, rng, n):
            return np.zeros(n, dtype=int)

    with pytest.raises(ValueError, match=r"workload\.prompt_len: .*must return 3 ints >= 1"):
        wl.burst(3, prompt_len=Broken())


GOOD = {"arrival_time": [0.0, 1.0], "prompt_len": [4, 5], "output_len": [2, 3]}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"arrival_time": None}, r"missing column 'arrival_time'"),
        ({"output_len": None}, r"missing column 'output_len'"),
        ({"prompt_len": None}, r"missing column 'prompt' \(text or token ids\) or 'prompt_len'"),
        ({"prompt": [[1, 2], None]}, r"column 'prompt_len' row 0 must be the number of token ids"),
        ({"prompt_len": [4, None]}, r"column 'prompt_len' row 1 must be an int >= 1"),
        ({"arrival_time": [0.0, -1.0]}, r"column 'arrival_time' row 1 must be a finite number"),
        ({"arrival_time": [float("nan"), 1.0]}, r"column 'arrival_time' row 0"),
        ({"arrival_time": ["soon", 1.0]}, r"column 'arrival_time' row 0"),
        ({"output_len": [2, 0]}, r"column 'output_len' row 1 must be an int >= 1"),
        ({"output_len": [2.5, 3]}, r"column 'output_len' row 0"),
        ({"prompt_len": [4, -5]}, r"column 'prompt_len' row 1"),
        ({"tenant": ["a", ""]}, r"column 'tenant' row 1 must be a non-empty str"),
        ({"priority": [0, float("nan")]}, r"column 'priority' row 1 must be an int"),
    ],
)
def test_bad_replay_tables_name_the_column_and_row(change, match):
    columns = {**GOOD, **change}
    table = pd.DataFrame({k: v for k, v in columns.items() if v is not None})
    if "prompt" in change:
        table = table.assign(prompt=change["prompt"])
    with pytest.raises(ValueError, match=match):
        wl.replay(table)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], r"column 'prompt' row 0"),
        ("", r"column 'prompt' row 0"),
        ([1, -2], "row 0"),
        (None, r"column 'prompt' row 0 must be a non-empty str or list"),
    ],
)
def test_bad_replay_prompts_name_the_row(prompt, match):
    table = pd.DataFrame({"arrival_time": [0.0], "prompt": [prompt], "output_len": [1]})
    with pytest.raises(ValueError, match=match):
        wl.replay(table)


def test_bad_replay_sources_and_token_ids(tmp_path, tiny):
    with pytest.raises(ValueError, match="no CSV file"):
        wl.replay(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="DataFrame or a CSV path"):
        wl.replay([{"arrival_time": 0}])
    with pytest.raises(ValueError, match="no rows"):
        wl.replay(pd.DataFrame({"arrival_time": [], "prompt_len": [], "output_len": []}))
    path = tmp_path / "neg.csv"
    path.write_text('arrival_time,prompt,output_len\n0.0,"[3, -1]",2\n')
    with pytest.raises(ValueError, match=r"column 'prompt' row 0"):
        wl.replay(path)
    out_of_vocab = pd.DataFrame({"arrival_time": [0.0], "prompt": [[1, 9999]], "output_len": [1]})
    with pytest.raises(ValueError, match=r"request 0: prompt token id 9999 is outside"):
        wl.replay(out_of_vocab).materialize(tiny)


# -- the shipped corpus -------------------------------------------------------------------
def test_corpus_is_shipped_public_domain_prose():
    data = importlib.resources.files("cortexlab").joinpath("data")
    text = data.joinpath("corpus.txt").read_text("utf-8")
    assert text == wl.corpus_text() and len(text.encode()) <= 300_000 and text.isascii()
    assert "Gutenberg" not in text and text.startswith("Chapter 1\n\nSir Walter Elliot")
    assert "public domain" in data.joinpath("README.md").read_text("utf-8")
