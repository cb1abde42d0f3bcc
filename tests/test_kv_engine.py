"""The KV zoo inside the engine: prefix-cache exactness and savings, parallel samples forked
with copy-on-write, the kv.* hook points, and the per-step accounting."""

from __future__ import annotations

import cortexlab as cl
from cortexlab.request import RequestState

import numpy as np
import pytest
from conftest import assert_all_free

ALLOCATORS = ["paged", "contiguous", "buddy", "prefix"]
GREEDY = cl.SamplingParams(max_tokens=10, ignore_eos=True)


def shared_prompts(num: int, system: int = 70, seed: int = 0) -> list[list[int]]:
    """`num` prompts that start with the same `system` tokens, then differ."""
    rng = np.random.default_rng(seed)
    head = [int(t) for t in rng.integers(0, 256, system)]
    return [head + [int(t) for t in rng.integers(0, 256, 5 + 3 * i)] for i in range(num)]


def run(engine, prompts, params, first=None):
    """Generate `prompts` (the `first` of them in a round of their own) under a Trace;
    returns (token lists, trace)."""
    trace = cl.Trace()
    out = []
    with engine.hooks(trace.hooks):
        for wave in [prompts[:first], prompts[first:]] if first else [prompts]:
            out += engine.generate(wave, params)
    return [r.token_ids for r in out], trace


# -- prefix cache ------------------------------------------------------------------------


def test_prefix_cache_gives_the_same_tokens_and_skips_the_shared_prefill(tiny):
    prompts = shared_prompts(6)
    plain, plain_trace = run(cl.Engine(tiny, allocator="paged", block_size=16), prompts, GREEDY, 1)
    engine = cl.Engine(tiny, allocator="prefix", block_size=16)
    cached, trace = run(engine, prompts, GREEDY, 1)
    assert cached == plain
    computed = trace.steps.num_batched_tokens.sum()
    # The second wave's five requests each reuse the 64 tokens of 4 full system blocks.
    assert plain_trace.steps.num_batched_tokens.sum() - computed == 5 * 64
    last = trace.steps.iloc[-1]
    assert last.kv_hit_tokens == 5 * 64
    # Admitted with a cache hit (computed tokens > 0) still counts as first scheduled.
    assert (trace.request_events.event == "request.scheduled").sum() == len(prompts)
    assert last.kv_lookup_tokens == sum(len(p) for p in prompts)
    assert last.kv_cached_slots > 0  # nobody holds the blocks now; they stay cached
    assert_all_free(engine)


def test_prefix_hit_is_never_the_whole_prompt(tiny):
    # The last prompt token is always computed: its logits pick the first output token.
    engine = cl.Engine(tiny, allocator="prefix", block_size=4)
    prompt = list(range(1, 33))  # exactly 8 full blocks
    first, _ = run(engine, [prompt], GREEDY)
    again, trace = run(engine, [prompt], GREEDY)
    assert again == first
    assert trace.steps.iloc[0].num_batched_tokens == 4  # 7 blocks hit, the last one recomputed
    assert engine.allocator.usage().num_hit_tokens == 28


def test_prefix_cache_evicts_lru_only_when_memory_is_needed(tiny):
    engine = cl.Engine(tiny, allocator="prefix", block_size=4, num_blocks=24)
    evicted = []
    prompts = shared_prompts(8, system=20, seed=3)
    with engine.hooks({"kv.evict": lambda e: evicted.extend(e.block_ids)}):
        run(engine, prompts[:1], GREEDY)
        assert not evicted and engine.allocator.usage().num_cached_blocks > 0
        tokens, _ = run(engine, prompts[1:], GREEDY)
    assert evicted, "a full arena must evict cached blocks"
    reference, _ = run(cl.Engine(tiny, block_size=4, num_blocks=24), prompts[1:], GREEDY)
    assert tokens == reference
    assert engine.allocator.usage().num_evicted_blocks == len(evicted)
    assert_all_free(engine)


@pytest.mark.parametrize("allocator", ["paged", "buddy", "prefix"])
def test_allocators_give_the_same_tokens_as_contiguous(tiny, allocator):
    prompts = shared_prompts(5, system=40, seed=1)
    params = cl.SamplingParams(max_tokens=20, ignore_eos=True)
    config = dict(block_size=4, num_blocks=64, max_num_batched_tokens=48)
    reference, _ = run(cl.Engine(tiny, allocator="contiguous", **config), prompts, params)
    engine = cl.Engine(tiny, allocator=allocator, **config)
    tokens, _ = run(engine, prompts, params)
    assert tokens == reference
    assert_all_free(engine)


# -- parallel samples --------------------------------------------------------------------


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_n_forks_equal_separate_requests_with_the_same_seeds(tiny, allocator):
    prompt = shared_prompts(1, system=37)[0]
    params = cl.SamplingParams(max_tokens=12, temperature=0.9, seed=11, ignore_eos=True)
    engine = cl.Engine(tiny, allocator=allocator, block_size=16)
    trace = cl.Trace()
    with engine.hooks(trace.hooks):
        [result] = engine.generate([prompt], cl.SamplingParams(**{**vars_of(params), "n": 4}))
    separate = cl.Engine(tiny, allocator=allocator, block_size=16).generate(
        [prompt] * 4,
        [cl.SamplingParams(**{**vars_of(params), "seed": 11 + i}) for i in range(4)],
    )
    assert [c.token_ids for c in result.completions] == [r.token_ids for r in separate]
    assert result.token_ids == result.completions[0].token_ids
    assert [c.request_id for c in result.completions] == [
        result.request_id,
        *(f"{result.request_id}#{i}" for i in (1, 2, 3)),
    ]
    assert len({tuple(c.token_ids) for c in result.completions}) > 1, "seeds must differ"
    # The prompt is computed once; every later step is one decode token per sample.
    assert trace.steps.num_prefill_tokens.sum() == len(prompt)
    assert set(trace.requests.request_id) == {c.request_id for c in result.completions}
    if allocator == "prefix":
        assert trace.steps.kv_max_sharing.max() == 4
        assert trace.steps.kv_shared_slots.max() == 3 * 16  # 37 tokens: 2 full + 1 partial
    assert_all_free(engine)


def vars_of(params: cl.SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__dataclass_fields__}


def test_fork_copies_the_shared_partial_block_once_per_writer(tiny):
    engine = cl.Engine(tiny, allocator="prefix", block_size=16)
    copies = []
    with engine.hooks({"kv.append": lambda e: copies.extend(e.data["copied"])}):
        engine.generate([list(range(1, 38))], cl.SamplingParams(max_tokens=3, n=3, seed=0))
    # Three tables share the partial third block: the first two writers copy it, the
    # last one then holds it alone and writes in place.
    assert len(copies) == 2 and len({src for src, _ in copies}) == 1
    assert_all_free(engine)


def test_forks_without_a_free_seat_run_as_their_own_requests(tiny):
    prompt = list(range(3, 30))
    params = cl.SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True, n=3)
    engine = cl.Engine(tiny, allocator="prefix", block_size=4, max_num_seqs=1)
    [result] = engine.generate([prompt], params)
    wide = cl.Engine(tiny, allocator="prefix", block_size=4).generate([prompt], params)
    assert [c.token_ids for c in result.completions] == [c.token_ids for c in wide[0].completions]
    assert all(c.finish_reason == "length" for c in result.completions)
    assert_all_free(engine)


def test_cancelling_a_parent_cancels_its_forks(tiny):
    engine = cl.Engine(tiny, allocator="prefix")
    params = cl.SamplingParams(max_tokens=30, ignore_eos=True, n=3)
    waiting = engine.submit(list(range(1, 20)), params)
    engine.cancel(waiting)
    running = engine.submit(list(range(1, 20)), params)
    engine.step()
    engine.step()
    assert all(s.state is RequestState.RUNNING for s in running.samples)
    engine.cancel(running)
    engine.run_until_done()
    for request in (waiting, running):
        assert [s.state for s in request.samples] == [RequestState.CANCELLED] * 3
    assert_all_free(engine)


def test_a_fork_cancelled_before_it_is_forked_stays_cancelled(tiny):
    engine = cl.Engine(tiny, allocator="prefix")
    request = engine.submit(list(range(1, 20)), cl.SamplingParams(max_tokens=5, n=3))
    engine.cancel(request.forks[0].request_id)
    engine.run_until_done()
    assert [s.state for s in request.samples] == [
        RequestState.FINISHED,
        RequestState.CANCELLED,
        RequestState.FINISHED,
    ]
    assert_all_free(engine)


def test_an_impossible_parent_fails_with_its_forks(tiny):
    engine = cl.Engine(tiny, block_size=4, num_blocks=4)
    request = engine.submit(list(range(1, 40)), cl.SamplingParams(max_tokens=4, n=2))
    assert [s.state for s in request.samples] == [RequestState.FAILED] * 2
    assert "can never fit" in request.forks[0].error
    [result] = engine.generate([[1, 2]], cl.SamplingParams(max_tokens=2, n=2))
    assert len(result.completions) == 2
    assert_all_free(engine)


# -- hooks and accounting ----------------------------------------------------------------


def test_kv_hooks_name_the_request_and_its_blocks(tiny):
    engine = cl.Engine(tiny, allocator="paged", block_size=4, num_blocks=40)
    events = []
    hooks = {p: events.append for p in ("kv.allocate", "kv.append", "kv.free")}
    with engine.hooks(hooks):
        [result] = engine.generate([list(range(1, 10))], cl.SamplingParams(max_tokens=8))
    request = engine.get_request(result.request_id)
    kinds = [e.name for e in events]
    assert kinds[0] == "kv.allocate" and kinds[-1] == "kv.free"
    assert all(e.request is request for e in events)
    assert events[0].block_ids == (0, 1, 2) and events[0].data["num_tokens"] == 9
    grown = [b for e in events if e.name == "kv.append" for b in e.block_ids]
    assert events[-1].block_ids == events[0].block_ids + tuple(grown)
    assert_all_free(engine)


def test_kv_allocate_fires_for_forks(tiny):
    engine = cl.Engine(tiny, allocator="prefix", block_size=4)
    events = []
    with engine.hooks({"kv.allocate": events.append}):
        [result] = engine.generate([list(range(1, 10))], cl.SamplingParams(max_tokens=2, n=2))
    fork_events = [e for e in events if "forked_from" in e.data]
    assert [e.request.request_id for e in fork_events] == [result.completions[1].request_id]
    assert fork_events[0].data["forked_from"] == result.request_id
    assert fork_events[0].block_ids == events[0].block_ids  # shared by reference


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_accounting_partitions_the_arena_every_step(tiny, allocator):
    engine = cl.Engine(tiny, allocator=allocator, block_size=4, num_blocks=48)
    snapshots = []
    trace = cl.Trace()
    prompts = shared_prompts(6, system=18, seed=2)
    with engine.hooks({**trace.hooks, "kv.blocks": snapshots.append}):
        engine.generate(prompts, cl.SamplingParams(max_tokens=14, ignore_eos=True))
    steps = trace.steps
    parts = steps[["kv_used_slots", "kv_reserved_slots", "kv_cached_slots", "kv_free_slots"]]
    assert (parts.sum(axis=1) == steps.kv_num_slots).all()
    assert (steps.kv_internal_slots <= steps.kv_reserved_slots).all()
    assert (steps.kv_external_slots <= steps.kv_free_slots + steps.kv_cached_slots).all()
    assert len(snapshots) == len(steps)
    for event, row in zip(snapshots, steps.itertuples(), strict=True):
        held = {b for table in event.data["tables"].values() for b in table}
        assert len(held) * 4 == row.kv_used_slots + row.kv_reserved_slots
        assert event.data["allocator"] == allocator
    if allocator == "contiguous":  # each reserves room for its 14 outputs up front
        assert steps.kv_reserved_slots.iloc[0] >= 14 * steps.num_running.iloc[0]
    if allocator == "paged":
        assert (steps.kv_external_slots == 0).all()
    assert_all_free(engine)


def test_generated_blocks_are_cached_for_a_follow_up_turn(tiny):
    engine = cl.Engine(tiny, allocator="prefix", block_size=4)
    prompt = list(range(1, 11))
    [first] = engine.generate([prompt], cl.SamplingParams(max_tokens=16, ignore_eos=True))
    # The follow-up repeats the conversation: prompt + answer, then a new question.
    follow_up = prompt + first.token_ids + [7, 8, 9]
    before = engine.allocator.usage().num_hit_tokens
    [second] = engine.generate([follow_up], cl.SamplingParams(max_tokens=4, ignore_eos=True))
    # 25 tokens had K/V computed (the last answer token never was): 6 full blocks.
    assert engine.allocator.usage().num_hit_tokens - before == 24
    [plain] = cl.Engine(tiny).generate(
        [follow_up], cl.SamplingParams(max_tokens=4, ignore_eos=True)
    )
    assert second.token_ids == plain.token_ids


def test_guard_refuses_a_write_into_a_block_another_request_reads(tiny):
    class NoCopyOnWrite(cl.kv.PrefixAllocator):
        def _written(self, seq, table, start, end):
            return []  # the bug: writes land in the block the other fork still reads

    engine = cl.Engine(tiny, allocator=NoCopyOnWrite(num_blocks=32, block_size=4))
    request = engine.submit(list(range(1, 8)), cl.SamplingParams(max_tokens=4, n=2))
    with pytest.raises(cl.guard.PolicyError, match="also reads \\(copy it on write first\\)"):
        engine.run_until_done()
    assert all(s.state is RequestState.FAILED for s in request.samples)
    assert_all_free(engine)
