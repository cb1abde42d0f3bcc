"""Engine: exact parity with mlx-lm, preemption, failures, cancellation, streaming, hooks."""

from __future__ import annotations

import threading
import time

import cortexlab as cl
from cortexlab.request import RequestState

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_all_free, mlx_lm_greedy, needs_smollm

PROMPT_LENGTHS = [1, 7, 16, 17, 50, 99, 150, 200]
MAX_TOKENS = 12


def tiny_prompts(lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    """mlx-lm's greedy tokens and log-probs for each tiny prompt, generated alone."""
    return [mlx_lm_greedy(tiny, p, MAX_TOKENS) for p in tiny_prompts()]


CONFIGS = {
    "paged-bs16": dict(allocator="paged", block_size=16),
    "paged-bs1": dict(allocator="paged", block_size=1),
    "contiguous-bs16": dict(allocator="contiguous", block_size=16),
    "contiguous-bs1": dict(allocator="contiguous", block_size=1),
    "paged-chunked": dict(allocator="paged", block_size=16, max_num_batched_tokens=64),
    "contiguous-chunked": dict(allocator="contiguous", block_size=1, max_num_batched_tokens=37),
    # Arenas that hold the longest request (200 + 12 tokens) alone but not all eight at once:
    # chunks admitted into partly free memory must later preempt to grow.
    "paged-preempt": dict(
        allocator="paged", block_size=16, num_blocks=14, max_num_batched_tokens=64
    ),
    "paged-preempt-bs1": dict(allocator="paged", block_size=1, num_blocks=212),
    "contiguous-tight": dict(allocator="contiguous", block_size=4, num_blocks=60),
    "buddy-bs16": dict(allocator="buddy", block_size=16),
    "buddy-bs1-chunked": dict(allocator="buddy", block_size=1, max_num_batched_tokens=37),
    "buddy-preempt": dict(
        allocator="buddy", block_size=16, num_blocks=16, max_num_batched_tokens=64
    ),
    "prefix-bs16": dict(allocator="prefix", block_size=16),
    # A preempted request recomputes through its own cached prompt blocks (cache hits).
    "prefix-preempt": dict(
        allocator="prefix", block_size=16, num_blocks=14, max_num_batched_tokens=64
    ),
    "prefix-preempt-bs1": dict(allocator="prefix", block_size=1, num_blocks=212),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_parity_with_mlx_lm(tiny, tiny_reference, name):
    engine = cl.Engine(tiny, **CONFIGS[name])
    logits_by_request: dict = {}
    forward = engine.runner.forward

    def recording_forward(rows):
        logits = forward(rows)
        sampled = [s.request for s in engine.last_batch.scheduled if s.needs_logits]
        for i, req in enumerate(sampled):
            logits_by_request.setdefault(req.request_id, []).append(logits[i])
        return logits

    engine.runner.forward = recording_forward
    params = cl.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    requests = [engine.submit(p, params) for p in tiny_prompts()]
    engine.run_until_done()
    for req, (ref_tokens, ref_logprobs) in zip(requests, tiny_reference, strict=True):
        assert req.finish_reason == cl.FinishReason.LENGTH
        assert req.output_token_ids == ref_tokens, f"request {req.request_id} ({name})"
        ours = logits_by_request[req.request_id]
        assert len(ours) == len(ref_logprobs)
        for step, (lg, ref) in enumerate(zip(ours, ref_logprobs, strict=True)):
            lp = lg - mx.logsumexp(lg)
            err = float(mx.abs(lp - ref.reshape(-1)).max())
            assert err < 1e-4, f"request {req.request_id} step {step}: max |dlogprob| {err}"
    if "preempt" in name:
        assert sum(r.num_preemptions for r in requests) > 0, "the config should force preemption"
    assert_all_free(engine)


@needs_smollm
def test_smollm_chat_parity_with_mlx_lm(smollm):
    prompts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Name three primary colors.",
        "Explain photosynthesis in one sentence.",
        "What is 12 times 12?",
        "Give me a synonym for happy.",
        "Translate 'good morning' into Spanish.",
        "List two planets in the solar system.",
    ]
    token_prompts = [smollm.encode_prompt(p, chat=True) for p in prompts]
    engine = cl.Engine(smollm)
    requests = [engine.submit(t, cl.SamplingParams(max_tokens=64)) for t in token_prompts]
    engine.run_until_done()
    eos = smollm.tokenizer.eos_token_ids
    for req, prompt in zip(requests, token_prompts, strict=True):
        ref, _ = mlx_lm_greedy(smollm, prompt, 64, stop_ids=eos)
        assert req.output_token_ids == ref, f"request {req.request_id}"
    assert requests[0].text == "The capital of France is Paris."
    assert_all_free(engine)


def test_request_too_large_fails_and_blocks_nobody(tiny):
    engine = cl.Engine(tiny, block_size=16, num_blocks=8)  # 128 slots
    ok = engine.submit(tiny_prompts([20])[0], cl.SamplingParams(max_tokens=5, ignore_eos=True))
    big = engine.submit(tiny_prompts([120])[0], cl.SamplingParams(max_tokens=50))
    ctx = engine.submit([1] * 10, cl.SamplingParams(max_tokens=tiny.max_context))
    ok2 = engine.submit([5, 6, 7], cl.SamplingParams(max_tokens=5, ignore_eos=True))
    engine.run_until_done()
    assert big.state is RequestState.FAILED and big.finish_reason == cl.FinishReason.ERROR
    assert "can never fit the KV arena" in big.error and "170" in big.error
    assert ctx.state is RequestState.FAILED and "exceeds the model's context" in ctx.error
    assert ok.state is RequestState.FINISHED and ok.num_output_tokens == 5
    assert ok2.state is RequestState.FINISHED and ok2.num_output_tokens == 5
    assert_all_free(engine)


def test_bad_token_id_is_rejected_at_submit(tiny):
    engine = cl.Engine(tiny)
    with pytest.raises(ValueError, match=r"token id 10000 at position 2 is outside the vocab"):
        engine.submit([1, 2, 10_000], cl.SamplingParams(max_tokens=3))
    good = engine.submit([1, 2, 3], cl.SamplingParams(max_tokens=3, ignore_eos=True))
    engine.run_until_done()
    assert good.num_output_tokens == 3
    assert_all_free(engine)


def test_cancel_mid_decode(tiny, tiny_reference):
    engine = cl.Engine(tiny)
    params = cl.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    keep, drop = (engine.submit(p, params) for p in tiny_prompts()[:2])
    for _ in range(4):
        engine.step()
    assert drop.state is RequestState.RUNNING and drop.num_output_tokens > 0
    engine.cancel(drop)
    engine.run_until_done()
    assert drop.state is RequestState.CANCELLED
    assert drop.finish_reason == cl.FinishReason.CANCELLED
    assert drop.num_output_tokens < MAX_TOKENS
    assert keep.output_token_ids == tiny_reference[0][0]
    assert_all_free(engine)


def test_cancel_waiting_request(tiny):
    engine = cl.Engine(tiny, max_num_seqs=1)
    first = engine.submit([1, 2, 3], cl.SamplingParams(max_tokens=4, ignore_eos=True))
    second = engine.submit([4, 5, 6], cl.SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert second.state is RequestState.WAITING
    engine.cancel(second.request_id)
    engine.run_until_done()
    assert second.state is RequestState.CANCELLED and second.num_output_tokens == 0
    assert first.num_output_tokens == 4
    assert_all_free(engine)


def test_stream_consumer_stops_early(tiny):
    engine = cl.Engine(tiny)
    stream = engine.stream("hello there", cl.SamplingParams(max_tokens=50, ignore_eos=True))
    received = [next(stream) for _ in range(3)]
    assert all(received)
    stream.close()
    request = engine.get_request(0)
    assert request.state is RequestState.CANCELLED
    assert request.num_output_tokens < 50
    assert_all_free(engine)


def test_stream_yields_the_full_text(tiny):
    engine = cl.Engine(tiny)
    params = cl.SamplingParams(max_tokens=20, ignore_eos=True)
    text = "".join(engine.stream("abc", params))
    [again] = cl.Engine(tiny).generate(["abc"], params)
    assert text == again.text and len(again.token_ids) == 20


def test_stop_strings_and_stop_tokens(tiny):
    engine = cl.Engine(tiny)
    [free_run] = engine.generate(["xyz"], cl.SamplingParams(max_tokens=30, ignore_eos=True))
    stop_token = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_token)
    [by_token] = engine.generate(
        ["xyz"], cl.SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[stop_token])
    )
    assert by_token.finish_reason == "stop"
    assert by_token.token_ids == free_run.token_ids[: first + 1]
    stop = free_run.text[10:12]
    [by_string] = engine.generate(
        ["xyz"], cl.SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])
    )
    assert by_string.finish_reason == "stop"
    assert by_string.text == free_run.text[: free_run.text.index(stop)]
    assert_all_free(engine)


def test_per_request_seed_independent_of_batch(tiny):
    params = cl.SamplingParams(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    [alone] = cl.Engine(tiny).generate(["seeded"], params)
    other = cl.SamplingParams(max_tokens=8, temperature=0.7, ignore_eos=True)
    greedy = cl.SamplingParams(max_tokens=8, ignore_eos=True)
    batch = cl.Engine(tiny).generate(
        ["a", "bb", "seeded", "ccc", "dd"], [other, greedy, params, other, greedy]
    )
    assert batch[2].token_ids == alone.token_ids
    [reseeded] = cl.Engine(tiny).generate(["seeded"], params)
    assert reseeded.token_ids == alone.token_ids


def test_generate_checks_arguments(tiny):
    engine = cl.Engine(tiny)
    with pytest.raises(ValueError, match="single str"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(["a", "b"], [cl.SamplingParams()])
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt must contain at least one"):
        engine.generate(["a", "", "c"])
    with pytest.raises(ValueError, match=r"params\[0\] must be a SamplingParams"):
        engine.generate(["a"], [{"max_tokens": 3}])
    assert not engine.has_unfinished, "a rejected batch queues nothing"
    with pytest.raises(ValueError, match=r"block_size must be an int in \[1, 65536\]"):
        cl.Engine(tiny, block_size=0)
    with pytest.raises(ValueError, match=r"max_num_seqs must be an int in \[1, 2\*\*31\)"):
        cl.Engine(tiny, max_num_seqs=0)
    with pytest.raises(ValueError, match="clock must be one of"):
        cl.Engine(tiny, clock="sundial")
    with pytest.raises(KeyError, match="fcfs"):
        cl.Engine(tiny, scheduler="nope")
    with pytest.raises(KeyError, match="paged"):
        cl.Engine(tiny, allocator="nope")


def test_strategies_accepted_as_objects(tiny):
    allocator = cl.kv.PagedAllocator(num_blocks=64, block_size=8)
    scheduler = cl.schedulers.FCFSScheduler()
    engine = cl.Engine(tiny, scheduler=scheduler, allocator=allocator)
    assert engine.allocator is allocator and engine.scheduler is scheduler
    assert engine.arena.num_blocks == 64 and engine.arena.block_size == 8
    [r] = engine.generate([[1, 2, 3]], cl.SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(r.token_ids) == 4


def test_trace_and_hooks(tiny):
    engine = cl.Engine(tiny, max_num_batched_tokens=64)
    trace = cl.Trace()
    firsts = []
    with engine.hooks(trace.hooks), engine.hooks({"request.first_token": firsts.append}):
        engine.generate(
            tiny_prompts([10, 100, 30]), cl.SamplingParams(max_tokens=5, ignore_eos=True)
        )
    steps, requests = trace.steps, trace.requests
    assert len(steps) == engine.num_steps
    assert (steps["num_batched_tokens"] <= 64).all()
    assert steps["num_generated_tokens"].sum() == 15
    assert (steps["duration"] > 0).all()
    assert len(requests) == 3 and (requests["num_output_tokens"] == 5).all()
    assert (requests["ttft"] > 0).all() and (requests["e2e"] >= requests["ttft"]).all()
    assert len(firsts) == 3
    events = trace.request_events
    assert list(events[events.request_id == 1].event) == [
        "request.arrived",
        "request.scheduled",
        "request.first_token",
        "request.finished",
    ]
    # Hooks are gone after the with-block.
    engine.generate([[1]], cl.SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(firsts) == 3 and len(trace.steps) == len(steps)
    with pytest.raises(ValueError, match="unknown hook point"):
        engine.add_hook("step.nope", print)


def test_submit_from_another_thread_while_background_loop_runs(tiny):
    engine = cl.Engine(tiny)
    engine.start()
    try:
        results = {}

        def worker(i):
            [results[i]] = engine.generate(
                [[i + 1] * (i + 2)], cl.SamplingParams(max_tokens=6, ignore_eos=True)
            )

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.stop()
    assert sorted(results) == [0, 1, 2, 3]
    assert all(len(r.token_ids) == 6 for r in results.values())
    assert_all_free(engine)


def test_measured_clock_advances_by_step_durations(tiny):
    engine = cl.Engine(tiny, clock="measured")
    trace = cl.Trace()
    with engine.hooks(trace.hooks):
        engine.generate([[1, 2, 3]], cl.SamplingParams(max_tokens=4, ignore_eos=True))
    steps = trace.steps
    assert engine.clock.now() == pytest.approx(steps["duration"].sum())


def test_future_arrivals_enter_at_their_time_on_the_measured_clock(tiny):
    engine = cl.Engine(tiny, clock="measured")
    params = cl.SamplingParams(max_tokens=3, ignore_eos=True)
    seen = []
    forward = engine.scheduler.schedule

    def spy(state):
        seen.append((state.now, [r.request_id for r in state.waiting]))
        return forward(state)

    engine.scheduler.schedule = spy
    early = engine.submit([1, 2, 3], params, arrival_time=0.0)
    late = engine.submit([4, 5, 6], params, arrival_time=100.0)
    t0 = time.perf_counter()
    engine.run_until_done()
    assert time.perf_counter() - t0 < 10, "idle time is jumped, not waited"
    assert late.arrival_time == 100.0 and late.first_scheduled_time >= 100.0
    assert all(1 not in ids for now, ids in seen if now < 100.0)
    assert early.finish_time < 100.0 <= late.first_token_time
    assert_all_free(engine)


def test_future_arrivals_wait_on_the_wall_clock_and_can_be_cancelled(tiny):
    engine = cl.Engine(tiny)
    params = cl.SamplingParams(max_tokens=2, ignore_eos=True)
    soon = engine.submit([1, 2], params, arrival_time=engine.clock.now() + 0.2)
    never = engine.submit([3, 4], params, arrival_time=engine.clock.now() + 60)
    engine.cancel(never)
    t0 = time.perf_counter()
    engine.run_until_done()
    assert 0.15 < time.perf_counter() - t0 < 30
    assert soon.state is RequestState.FINISHED and soon.first_scheduled_time >= 0.2
    assert never.state is RequestState.CANCELLED and never.num_output_tokens == 0
    with pytest.raises(ValueError, match="arrival_time must be a finite float >= 0"):
        engine.submit([1], params, arrival_time=float("nan"))
    assert_all_free(engine)
