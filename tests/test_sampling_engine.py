"""Sampling inside the engine: orders, submit-time checks, per-request state, logprobs,
the sampler.distribution hook, fallbacks."""

from __future__ import annotations

import math

import cortexlab as cl

import numpy as np
import pytest
from conftest import assert_all_free

SP = cl.SamplingParams
PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


def test_engine_takes_a_default_order_and_requests_override_it(tiny):
    with pytest.raises(ValueError, match="sampling_order: unknown sampling order 'vllm'"):
        cl.Engine(tiny, sampling_order="vllm")
    # top_k=3 then top_p=0.5 vs top_p first: the orders give different supports, so the
    # same seeds draw differently somewhere; each request follows its own order.
    params = SP(max_tokens=12, temperature=1.5, top_k=3, top_p=0.5, seed=1, ignore_eos=True)
    mlx_lm = cl.Engine(tiny, sampling_order="mlx-lm").generate(PROMPTS, params)
    hf = cl.Engine(tiny).generate(PROMPTS, params)
    per_request = cl.Engine(tiny).generate(PROMPTS, SP(**{**_fields(params), "order": "mlx-lm"}))
    assert [r.token_ids for r in per_request] == [r.token_ids for r in mlx_lm]
    assert [r.token_ids for r in hf] != [r.token_ids for r in mlx_lm]


def _fields(params) -> dict:
    import dataclasses

    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def test_bad_logit_bias_is_refused_at_submit_naming_key_and_vocab(tiny):
    engine = cl.Engine(tiny)
    with pytest.raises(
        ValueError, match=r"logit_bias: token id 300 is outside the vocabulary \[0, 259\)"
    ):
        engine.submit([1, 2], SP(logit_bias={5: 1.0, 300: 2.0}))
    with pytest.raises(ValueError, match=r"params\[1\]: .*banned_token_ids: token id 999"):
        engine.generate([[1], [2]], [SP(), SP(banned_token_ids=[999])])
    with pytest.raises(ValueError, match=r"stop_token_ids: token id 259 is outside the vocab"):
        engine.submit([1], SP(stop_token_ids=[3, 259]))
    with pytest.raises(ValueError, match="use the 'min_p' stage but the sampling order"):
        engine.submit([1], SP(temperature=1.0, min_p=0.1, order=["temperature"]))
    assert not engine.has_unfinished and not engine.requests.active


def test_stages_that_need_history_follow_each_request(tiny):
    engine = cl.Engine(tiny)
    base = dict(max_tokens=16, ignore_eos=True)
    plain, penalised = engine.generate(
        [PROMPTS[0], PROMPTS[0]],
        [SP(**base), SP(**base, frequency_penalty=2.0, presence_penalty=2.0)],
    )
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))
    request = engine.get_request(penalised.request_id)
    ids, counts = request.sampling_state.output_counts()
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == {
        t: float(penalised.token_ids.count(t)) for t in set(penalised.token_ids)
    }
    assert request.sampling_state.output is request.output_token_ids  # a reference, no copy


def test_min_tokens_and_allowed_tokens_in_the_engine(tiny):
    engine = cl.Engine(tiny)
    [greedy] = engine.generate([PROMPTS[1]], SP(max_tokens=1, ignore_eos=True))
    first = greedy.token_ids[0]
    [held] = engine.generate([PROMPTS[1]], SP(max_tokens=6, min_tokens=4, stop_token_ids=[first]))
    assert first not in held.token_ids[:4]
    [only] = engine.generate(
        [PROMPTS[2]], SP(max_tokens=6, temperature=1.0, allowed_token_ids=[7, 9], ignore_eos=True)
    )
    assert set(only.token_ids) <= {7, 9}
    assert_all_free(engine)


def test_mirostat_state_lives_on_the_request(tiny):
    engine = cl.Engine(tiny, block_size=4, num_blocks=12)  # small: requests get preempted
    params = SP(max_tokens=20, temperature=1.0, mirostat_tau=4.0, seed=3, ignore_eos=True)
    requests = [engine.submit(p, params) for p in PROMPTS]
    engine.run_until_done()
    assert sum(r.num_preemptions for r in requests) > 0
    mus = [r.sampling_state.stage_state["mirostat"] for r in requests]
    assert all(math.isfinite(mu) and mu != 8.0 for mu in mus)
    again = cl.Engine(tiny)
    rerun = [again.submit(p, params) for p in PROMPTS]
    again.run_until_done()
    assert [r.output_token_ids for r in rerun] == [r.output_token_ids for r in requests]


def test_logprobs_are_openai_shaped_and_of_the_final_distribution(tiny):
    engine = cl.Engine(tiny)
    logits_seen = []
    forward = engine.runner.forward

    def recording(rows):
        out = forward(rows)
        logits_seen.append(np.array(out))
        return out

    engine.runner.forward = recording
    params = SP(max_tokens=5, temperature=0.7, top_k=20, logprobs=3, seed=2, ignore_eos=True)
    [result] = engine.generate([PROMPTS[0]], params)
    assert len(result.logprobs) == len(result.token_ids) == 5
    for entry, token, row in zip(result.logprobs, result.token_ids, logits_seen, strict=True):
        assert entry["token_id"] == token and isinstance(entry["token"], str)
        assert isinstance(entry["bytes"], list) and len(entry["top_logprobs"]) == 3
        final = cl.sampling.distribution(row[0], params)
        assert entry["logprob"] == pytest.approx(math.log(final[token]), abs=1e-4)
        raw = row[0].astype(np.float64)
        raw_lp = raw - (raw.max() + np.log(np.exp(raw - raw.max()).sum()))
        assert entry["raw_logprob"] == pytest.approx(raw_lp[token], abs=1e-4)
        assert entry["rank"] == int((final > final[token]).sum()) + 1
        top = [t["token_id"] for t in entry["top_logprobs"]]
        assert top == np.argsort(-final, kind="stable")[:3].tolist()
    [plain] = engine.generate([PROMPTS[0]], SP(max_tokens=2))
    assert plain.logprobs is None


def test_sampler_distribution_hook(tiny):
    engine = cl.Engine(tiny)
    events = []
    params = SP(max_tokens=4, temperature=1.0, top_k=10, top_p=0.9, seed=5, ignore_eos=True)
    with engine.hooks({"sampler.distribution": events.append}):
        results = engine.generate(PROMPTS[:2], [params, SP(max_tokens=4, ignore_eos=True)])
    assert sum(len(e.rows) for e in events) == 8
    row = next(r for e in events for r in e.rows if r["request_id"] == results[0].request_id)
    assert [s["stage"] for s in row["stages"]] == ["input", "top_k", "top_p"]
    assert row["stages"][0]["num_kept"] == tiny.vocab_size
    assert row["stages"][1]["num_kept"] == 10 >= row["stages"][2]["num_kept"] >= 1
    assert row["token"] in row["stages"][-1]["top_ids"] or row["stages"][-1]["num_kept"] > 8
    assert 0 <= row["entropy"] <= math.log(10) + 1e-6 and row["fallback"] is False
    greedy_row = next(r for e in events for r in e.rows if r["request_id"] == results[1].request_id)
    assert [s["stage"] for s in greedy_row["stages"]] == ["input"]
    # Nobody listening: no event is built (and the same tokens come out).
    again = engine.generate(PROMPTS[:2], [params, SP(max_tokens=4, ignore_eos=True)])
    assert [r.token_ids for r in again] == [r.token_ids for r in results]


def test_a_fully_filtered_request_falls_back_and_records_it(tiny):
    engine = cl.Engine(tiny)
    params = SP(
        max_tokens=3,
        temperature=1.0,
        allowed_token_ids=[4],
        banned_token_ids=[4],
        ignore_eos=True,
        logprobs=0,
    )
    [result] = engine.generate([PROMPTS[0]], params)
    [greedy] = engine.generate([PROMPTS[0]], SP(max_tokens=3, ignore_eos=True))
    assert result.token_ids == greedy.token_ids
    assert result.metrics["num_sampling_fallbacks"] == 3
    assert all(e["fallback"] for e in result.logprobs)
    assert greedy.metrics["num_sampling_fallbacks"] == 0
