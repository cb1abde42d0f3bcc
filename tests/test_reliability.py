"""Robustness: no hang, no crash, no lost request, whatever a hook, a policy or a config does.

Each case of issue 7's list has a test here; every test that drives the engine ends by
checking that every request is terminal and every block is free, then that the engine still
produces correct tokens.
"""

from __future__ import annotations

import gc
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import cortexlab as cl
from cortexlab.guard import PolicyError, StallError
from cortexlab.request import RequestState
from cortexlab.schedulers import Batch, FCFSScheduler

import numpy as np
import pytest
from conftest import assert_all_free, needs_smollm

pytestmark = pytest.mark.timeout(120)

GREEDY = cl.SamplingParams(max_tokens=6, ignore_eos=True)


def prompts(n: int, length: int = 5, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, length)] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny):
    """Greedy tokens of the standard prompts on a clean engine."""
    return [r.token_ids for r in cl.Engine(tiny).generate(prompts(4), GREEDY)]


def assert_still_correct(engine, reference) -> None:
    """The engine, after whatever happened, gives the clean engine's tokens again."""
    results = engine.generate(prompts(4), GREEDY)
    assert [r.token_ids for r in results] == reference
    assert_all_free(engine)


def raising(message="boom"):
    def hook(event):
        raise RuntimeError(message)

    return hook


# -- hooks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("point", cl.HOOK_POINTS)
def test_a_raising_hook_is_reported_once_removed_and_harmless(tiny, reference, point):
    # Four requests need 12 blocks at the end: growing them preempts, so every point fires
    # (kv.evict needs the prefix cache: preempted requests' blocks stay cached, then go).
    allocator = "prefix" if point.startswith("kv.") else "paged"
    engine = cl.Engine(tiny, block_size=4, num_blocks=9, allocator=allocator)
    bad = raising(f"bad hook at {point}")
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with engine.hooks({point: bad}), engine.hooks({point: seen.append}):
            results = engine.generate(prompts(4), GREEDY)
    assert [r.token_ids for r in results] == reference
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "raising.<locals>.hook" in messages[0] and point in messages[0]
    assert f"RuntimeError: bad hook at {point}" in messages[0]
    assert engine.hook_manager.errors[0][:2] == (point, "raising.<locals>.hook")
    assert seen, "the well-behaved hook at the same point kept running"
    assert not engine.hook_manager.is_active(point)
    assert_all_free(engine)


def test_raising_arrival_hook_drops_no_arrival_or_cancel(tiny):
    engine = cl.Engine(tiny)
    requests = [engine.submit(p, GREEDY) for p in prompts(3)]
    engine.cancel(requests[2])
    with pytest.warns(RuntimeWarning, match="request.arrived"):
        with engine.hooks({"request.arrived": raising()}):
            engine.run_until_done()
    assert [r.state for r in requests] == [
        RequestState.FINISHED,
        RequestState.FINISHED,
        RequestState.CANCELLED,
    ]
    assert_all_free(engine)


@pytest.mark.parametrize("point", ["request.first_token", "request.finished"])
def test_raising_hook_after_sampling_leaves_no_request_running(tiny, reference, point):
    engine = cl.Engine(tiny)
    with pytest.warns(RuntimeWarning, match=point):
        engine.add_hook(point, raising())
        requests = [engine.submit(p, GREEDY) for p in prompts(4)]
        engine.run_until_done()
    assert [r.output_token_ids for r in requests] == reference
    assert_all_free(engine)


def test_hooks_must_be_callable(tiny):
    engine = cl.Engine(tiny)
    with pytest.raises(TypeError, match="hook for 'step.end' must be callable"):
        engine.add_hook("step.end", "not a function")
    with pytest.raises(TypeError, match="must be callable"):
        with engine.hooks({"step.begin": print, "step.end": 42}):
            pass
    assert not engine.hook_manager.is_active("step.begin"), "nothing half-added"
    with pytest.raises(TypeError, match="mapping"):
        engine.hooks([("step.end", print)]).__enter__()


def test_raising_hook_under_background_loop(tiny, reference):
    engine = cl.Engine(tiny)
    engine.add_hook("step.end", raising())
    engine.start()
    try:
        with pytest.warns(RuntimeWarning, match="step.end"):
            results = engine.generate(prompts(4), GREEDY)
        assert engine._background.is_alive()
    finally:
        engine.stop()
    assert [r.token_ids for r in results] == reference
    assert_all_free(engine)


# -- request ids and inputs at the door ------------------------------------------------------


def test_explicit_ids_never_collide_with_automatic_ones(tiny):
    engine = cl.Engine(tiny)
    explicit = engine.submit([1, 2], GREEDY, request_id=1)
    autos = [engine.submit([3, 4], GREEDY) for _ in range(3)]
    assert [r.request_id for r in autos] == [0, 2, 3]
    with pytest.raises(ValueError, match="request_id 2 is already in use"):
        engine.submit([5], GREEDY, request_id=2)
    with pytest.raises(ValueError, match="request_id must be a str or an int"):
        engine.submit([5], GREEDY, request_id=1.5)
    engine.run_until_done()
    assert explicit.num_output_tokens == 6 and all(r.num_output_tokens == 6 for r in autos)
    assert_all_free(engine)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([1.5, 2.7], "must be ints, got float 1.5 at position 0"),
        ([1, "2"], "must be ints, got str '2' at position 1"),
        ([True, 2], "must be ints, got bool True at position 0"),
        (b"abc", "a str or a sequence of int token ids, got bytes"),
        ([[1, 2], [3]], "must be ints, got list"),
        (None, "got NoneType"),
        ([1, 2, 259], "token id 259 at position 2 is outside the vocabulary \\[0, 259\\)"),
        ([-3], "must be >= 0, got -3 at position 0"),
        ([], "at least one token"),
    ],
)
def test_token_ids_are_checked_at_submit(tiny, prompt, match):
    engine = cl.Engine(tiny)
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, GREEDY)
    assert not engine.has_unfinished


def test_numpy_token_ids_are_accepted(tiny, reference):
    engine = cl.Engine(tiny)
    [r] = engine.generate([np.array(prompts(1)[0], dtype=np.int64)], GREEDY)
    assert r.token_ids == reference[0]


# -- engine arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_blocks": 10**12}, ValueError, "num_blocks must be <= "),
        ({"num_blocks": 10**7}, ValueError, "of KV arena but this machine has"),
        ({"num_blocks": 0}, ValueError, "num_blocks must be an int >= 1"),
        ({"kv_memory_bytes": 10**15}, ValueError, "exceeds this machine's memory"),
        ({"kv_memory_bytes": 1}, ValueError, "kv_memory_bytes=1 holds no block"),
        ({"block_size": 10**6}, ValueError, "block_size must be an int in"),
        ({"block_size": 2.0}, ValueError, "block_size must be an int in"),
        ({"max_num_seqs": 2**40}, ValueError, "max_num_seqs must be an int in"),
        ({"max_num_batched_tokens": -1}, ValueError, "max_num_batched_tokens must be an int"),
        ({"enable_chunked_prefill": "no"}, ValueError, "enable_chunked_prefill must be a bool"),
        ({"check_policies": 1}, ValueError, "check_policies must be a bool"),
        ({"stall_timeout": 0}, ValueError, "stall_timeout must be"),
        ({"max_history": -1}, ValueError, "max_history must be an int >= 0"),
        ({"scheduler": None}, TypeError, "scheduler must be a registered name"),
        ({"scheduler": 123}, TypeError, "scheduler must be a registered name"),
        ({"scheduler": "nope"}, KeyError, "unknown scheduler 'nope'; available: fair, fcfs, ltr"),
        ({"allocator": 123}, TypeError, "allocator must be a registered name.*lacks"),
        ({"allocator": object()}, TypeError, "lacks can_ever_fit"),
        ({"allocator": "nope"}, KeyError, "unknown allocator 'nope'; available: buddy, contiguous"),
        ({"clock": "sundial"}, ValueError, "clock must be one of"),
    ],
)
def test_engine_arguments_are_checked_at_construction(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        cl.Engine(tiny, **kwargs)


def test_model_must_be_a_model():
    with pytest.raises(TypeError, match="model must be a cortexlab Model"):
        cl.Engine("tiny-random")


def test_idle_engine_holds_a_small_arena_that_grows_with_use(tiny):
    engine = cl.Engine(tiny, block_size=4, num_blocks=4096)
    small = engine.arena.nbytes
    assert engine.arena.capacity < engine.allocator.num_blocks
    engine.generate([[1] * 600], cl.SamplingParams(max_tokens=2, ignore_eos=True))
    assert engine.arena.capacity >= 151 and engine.arena.nbytes > small
    assert_all_free(engine)


@needs_smollm
def test_default_smollm_engine_does_not_hold_a_gib(smollm):
    engines = [cl.Engine(smollm) for _ in range(3)]
    assert engines[0].allocator.num_blocks * 16 * smollm.kv_bytes_per_token > 2**29
    assert sum(e.arena.nbytes for e in engines) < 3 * 2**26


# -- impossible requests ---------------------------------------------------------------------


def test_prompt_over_budget_without_chunked_prefill_fails_at_submit(tiny):
    engine = cl.Engine(tiny, enable_chunked_prefill=False, max_num_batched_tokens=32)
    long = engine.submit([1] * 40, GREEDY)
    assert long.state is RequestState.FAILED
    assert "exceeds max_num_batched_tokens=32 and enable_chunked_prefill is False" in long.error
    ok = engine.submit([1] * 30, GREEDY)
    engine.run_until_done()
    assert ok.num_output_tokens == 6
    [result] = engine.generate([[2] * 33], GREEDY)
    assert result.finish_reason == "error" and "max_num_batched_tokens" in result.error
    assert_all_free(engine)


def test_impossible_request_is_traced(tiny):
    engine = cl.Engine(tiny, num_blocks=2, block_size=4)
    trace = cl.Trace()
    with engine.hooks(trace.hooks):
        [result] = engine.generate([[1] * 20], GREEDY)
    assert "can never fit the KV arena" in result.error
    assert list(trace.request_events.event) == ["request.arrived", "request.finished"]
    assert trace.requests.state.tolist() == ["failed"]


def test_recompute_after_preemption_is_chunked_even_without_chunked_prefill(tiny):
    # 14-token prompts fit the 16-token budget; after preemption, prompt + output does not.
    engine = cl.Engine(
        tiny,
        enable_chunked_prefill=False,
        max_num_batched_tokens=16,
        block_size=4,
        num_blocks=12,
    )
    params = cl.SamplingParams(max_tokens=20, ignore_eos=True)
    requests = [engine.submit(p, params) for p in prompts(2, length=14)]
    engine.run_until_done()
    assert all(r.num_output_tokens == 20 for r in requests)
    assert sum(r.num_preemptions for r in requests) > 0
    assert_all_free(engine)


# -- the policy guard ------------------------------------------------------------------------


class Mutant(FCFSScheduler):
    """FCFS whose batch is broken in one way once `armed`."""

    def __init__(self, how: str) -> None:
        self.how, self.armed = how, True

    def schedule(self, state):
        batch = super().schedule(state)
        if not self.armed:
            return batch
        if self.how == "none":
            return None
        if self.how == "twice" and batch.scheduled:
            batch.scheduled.append(batch.scheduled[0])
        if self.how == "too_many_tokens" and batch.scheduled:
            batch.scheduled[0].num_new_tokens += 1
        if self.how == "not_admitted" and state.waiting:
            batch.add(state.waiting[0], 1)
        if self.how == "zero_tokens" and batch.scheduled:
            batch.scheduled[0].num_new_tokens = 0
        if self.how == "over_budget":
            batch.scheduled[0].num_new_tokens = 10**6
        if self.how == "raise":
            raise AttributeError("'Request' object has no attribute 'deadline'")
        return batch


@pytest.mark.parametrize(
    ("how", "rule"),
    [
        ("none", "schedule\\(\\) must return a Batch, got NoneType"),
        ("twice", "is scheduled twice in one step"),
        ("too_many_tokens", "num_new_tokens=6; it must be an int in \\[1, 5\\]"),
        ("not_admitted", "is scheduled while WAITING and not in state.running; admit it first"),
        ("zero_tokens", "num_new_tokens=0"),
        ("over_budget", "num_new_tokens=1000000"),
        ("raise", "schedule\\(\\) raised AttributeError: 'Request' object has no attribute"),
    ],
)
def test_broken_scheduler_fails_its_step_with_a_policy_error(tiny, reference, how, rule):
    mutant = Mutant(how)
    engine = cl.Engine(tiny, scheduler=mutant, max_num_seqs=2)
    with pytest.raises(PolicyError, match=f"^Mutant: .*{rule}") as info:
        engine.generate(prompts(4), GREEDY)
    assert info.value.policy == "Mutant"
    failed = [engine.get_request(i) for i in range(4)]
    assert all(r.is_finished for r in failed)
    assert any(r.exception is info.value for r in failed)
    assert not engine.has_unfinished
    assert_all_free(engine)
    mutant.armed = False
    assert_still_correct(engine, reference)


class TamperingAllocator(cl.kv.PagedAllocator):
    """Paged, but the block table it writes on the request is wrong once `armed`."""

    def __init__(self, how: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.how, self.armed, self.last = how, True, None

    def allocate(self, seq, num_tokens):
        super().allocate(seq, num_tokens)
        if self.armed and self.last is not None:
            if self.how == "out_of_range":
                seq.block_table[0] = self.num_blocks + 5
            elif self.how == "shared":
                seq.block_table[0] = self.last.block_table[0]
            elif self.how == "short":
                seq.block_table.pop()
        self.last = seq


@pytest.mark.parametrize(
    ("how", "rule"),
    [
        ("out_of_range", "holds block id 69, outside the arena's \\[0, 64\\)"),
        ("shared", "block 0 is handed to both request 0 and request 1"),
        ("short", "is scheduled up to position 5 but its block table holds 0 block"),
    ],
)
def test_broken_allocator_is_caught_before_the_arena(tiny, reference, how, rule):
    allocator = TamperingAllocator(how, num_blocks=64, block_size=8)
    engine = cl.Engine(tiny, allocator=allocator)
    before = [np.array(k) for k in engine.arena.keys]
    with pytest.raises(PolicyError, match=f"^TamperingAllocator: .*{rule}"):
        engine.generate(prompts(2), GREEDY)
    after = [np.array(k) for k in engine.arena.keys]
    assert all((a == b).all() for a, b in zip(before, after, strict=True)), "arena untouched"
    assert not engine.has_unfinished
    allocator.armed = False
    allocator.last = None
    assert_still_correct(engine, reference)


def test_guard_off_still_refuses_out_of_range_blocks(tiny, reference):
    allocator = TamperingAllocator("out_of_range", num_blocks=64, block_size=8)
    engine = cl.Engine(tiny, allocator=allocator, check_policies=False)
    with pytest.raises(cl.engine.StepError, match="block id 69 is outside the arena"):
        engine.generate(prompts(2), GREEDY)
    allocator.armed = False
    assert_still_correct(engine, reference)


def test_plain_function_scheduler(tiny, reference):
    fcfs = FCFSScheduler()
    calls = []

    def my_policy(state):
        calls.append(len(state.waiting))
        return fcfs.schedule(state)

    engine = cl.Engine(tiny, scheduler=my_policy)
    assert [r.token_ids for r in engine.generate(prompts(4), GREEDY)] == reference
    assert calls

    @cl.schedulers.register("test_function_policy")
    def registered(state):
        return fcfs.schedule(state)

    try:
        engine = cl.Engine(tiny, scheduler="test_function_policy")
        assert engine.scheduler.name == "test_function_policy"
        assert_still_correct(engine, reference)
        assert "test_function_policy" in cl.schedulers.available()
    finally:
        cl.schedulers.schedulers._factories.pop("test_function_policy")


def test_function_scheduler_error_names_the_function(tiny):
    def lazy_policy(state):
        return Batch()

    engine = cl.Engine(tiny, scheduler=lambda state: None)
    with pytest.raises(
        PolicyError,
        match="^test_function_scheduler_error_names_the_function.<locals>.<lambda>: schedule",
    ):
        engine.generate([[1, 2]], GREEDY)
    engine = cl.Engine(tiny, scheduler=lazy_policy, stall_timeout=0.05)
    with pytest.raises(StallError, match="lazy_policy scheduled nothing while 1 request"):
        engine.generate([[1, 2]], GREEDY)


# -- progress --------------------------------------------------------------------------------


class Never(FCFSScheduler):
    """Never schedules request 1."""

    def schedule(self, state):
        hidden = [r for r in state.waiting if r.request_id == 1]
        for r in hidden:
            state.waiting.remove(r)
        try:
            return super().schedule(state)
        finally:
            state.waiting.extend(hidden)


def test_stall_fails_the_stuck_requests_and_names_the_policy(tiny):
    engine = cl.Engine(tiny, scheduler=Never(), stall_timeout=0.05)
    requests = [engine.submit(p, GREEDY) for p in prompts(3)]
    with pytest.raises(StallError, match="Never scheduled nothing while 1 request\\(s\\) wait"):
        engine.run_until_done()
    assert [r.state for r in requests] == [
        RequestState.FINISHED,
        RequestState.FAILED,
        RequestState.FINISHED,
    ]
    assert "can_allocate" in requests[1].error
    assert_all_free(engine)


def test_stall_in_background_wakes_the_caller(tiny):
    engine = cl.Engine(tiny, scheduler=lambda state: Batch(), stall_timeout=0.05)
    engine.start()
    try:
        with pytest.raises(StallError):
            engine.generate([[1, 2, 3]], GREEDY)
    finally:
        engine.stop()


def test_policy_error_in_background_wakes_callers_and_loop_survives(tiny, reference):
    mutant = Mutant("twice")
    engine = cl.Engine(tiny, scheduler=mutant)
    engine.start()
    try:
        with pytest.raises(PolicyError, match="twice"):
            engine.generate(prompts(2), GREEDY)
        mutant.armed = False
        assert engine._background.is_alive()
        assert [r.token_ids for r in engine.generate(prompts(4), GREEDY)] == reference
    finally:
        engine.stop()
    assert_all_free(engine)


def test_forward_error_fails_that_step_only(tiny, reference):
    engine = cl.Engine(tiny)
    forward, calls = engine.runner.forward, []

    def flaky(rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("[metal::malloc] pretend the device ran out of memory")
        return forward(rows)

    engine.runner.forward = flaky
    first = engine.submit(prompts(1)[0], GREEDY)
    engine.step()
    with pytest.raises(cl.engine.StepError, match="pretend the device ran out"):
        engine.generate(prompts(2, seed=1), GREEDY)
    assert first.state is RequestState.FAILED and "forward pass" in first.error
    assert_still_correct(engine, reference)


def test_stream_raises_a_step_error(tiny):
    engine = cl.Engine(tiny, scheduler=Mutant("none"))
    with pytest.raises(PolicyError):
        list(engine.stream("hello", GREEDY))
    assert_all_free(engine)


# -- trace and memory ------------------------------------------------------------------------


def test_trace_keeps_the_measured_step_duration(tiny):
    engine = cl.Engine(tiny)
    trace = cl.Trace()
    durations = []
    with (
        engine.hooks(trace.hooks),
        engine.hooks({"step.end": lambda e: durations.append(e.data["duration"])}),
    ):
        engine.generate(prompts(2), GREEDY)
    assert trace.steps["duration"].tolist() == durations


def test_trace_and_engine_let_finished_requests_go(tiny):
    engine = cl.Engine(tiny, max_history=2)
    trace = cl.Trace()
    with engine.hooks(trace.hooks):
        requests = [engine.submit(p, GREEDY) for p in prompts(5)]
        engine.run_until_done()
    refs = [weakref.ref(r) for r in requests]
    del requests
    engine.last_batch = None
    gc.collect()
    alive = [i for i, ref in enumerate(refs) if ref() is not None]
    assert alive == [3, 4], "only the last max_history requests are kept"
    assert len(trace.requests) == 5 and (trace.requests.num_output_tokens == 6).all()
    with pytest.raises(KeyError, match="no longer kept"):
        engine.get_request(0)
    assert engine.get_request(4).num_output_tokens == 6


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.timeout(300)
def test_memory_stays_flat_over_20000_requests(tiny):
    engine = cl.Engine(tiny, max_num_seqs=128, max_num_batched_tokens=1024, block_size=4)
    params = cl.SamplingParams(max_tokens=2, ignore_eos=True)

    def run(n: int) -> tuple[int, int]:
        for i in range(n):
            engine.submit([1 + i % 200, 2, 3], params)
        engine.run_until_done()
        gc.collect()
        return _rss_bytes(), len(gc.get_objects())

    run(500)  # warm up: allocator, arena, MLX caches
    rss_2k, objects_2k = run(2_000)
    for _ in range(9):
        run(2_000)
    rss_20k, objects_20k = run(0)
    assert objects_20k - objects_2k < 5_000, (objects_2k, objects_20k)
    assert rss_20k - rss_2k < 32 * 2**20, (rss_2k, rss_20k)
    assert len(engine.requests.history) == engine.requests.max_history
    assert not engine.requests.active
    assert_all_free(engine)


# -- process exit ----------------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import cortexlab as cl
    engine = cl.Engine(cl.load_model("tiny-random"))
    engine.start()
    [r] = engine.generate([[1, 2, 3]], cl.SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(r.token_ids) == 4
    engine.stop()
    other = cl.Engine(cl.load_model("tiny-random"))
    other.start()  # never stopped: interpreter exit must stop it
    other.generate([[4, 5]], cl.SamplingParams(max_tokens=2, ignore_eos=True))
    print("done")
    """
)


def _run_many(commands: list[list[str]], parallel: int = 4) -> list[subprocess.CompletedProcess]:
    results: list = [None] * len(commands)

    def worker(indices):
        for i in indices:
            results[i] = subprocess.run(commands[i], capture_output=True, text=True, timeout=120)

    threads = [
        threading.Thread(target=worker, args=(range(k, len(commands), parallel),))
        for k in range(parallel)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# Each process costs ~1 s of import and model load on two cores: 12 runs per test (4 at a
# time, so exits race each other too) keep the whole suite inside its time budget.
NUM_EXIT_RUNS = 12


@pytest.mark.timeout(600)
def test_start_generate_stop_exit_never_aborts():
    runs = _run_many([[sys.executable, "-c", EXIT_SCRIPT]] * NUM_EXIT_RUNS)
    codes = [r.returncode for r in runs]
    assert codes == [0] * NUM_EXIT_RUNS, [r.stderr[-500:] for r in runs if r.returncode][:1]
    assert all(r.stdout.strip() == "done" for r in runs)


@pytest.mark.timeout(600)
def test_cli_generate_exits_cleanly_every_time():
    cli = [sys.executable, "-m", "cortexlab.cli", "generate", "--model", "tiny-random"]
    runs = _run_many([[*cli, "--no-chat", "--max-tokens", "3", "hi"]] * NUM_EXIT_RUNS)
    codes = [r.returncode for r in runs]
    assert codes == [0] * NUM_EXIT_RUNS, [r.stderr[-500:] for r in runs if r.returncode][:1]


# -- random workloads with faults ------------------------------------------------------------


class FlakyScheduler(FCFSScheduler):
    """FCFS that breaks the contract in one way at one step (or, for 'stall', from then on)."""

    def __init__(self, how: str, at_step: int) -> None:
        self.how, self.at_step, self.num_calls = how, at_step, 0

    def schedule(self, state):
        self.num_calls += 1
        if self.how == "stall" and self.num_calls >= self.at_step:
            return Batch()
        if self.num_calls != self.at_step:
            return super().schedule(state)
        if self.how == "raise":
            raise RuntimeError("flaky scheduler")
        batch = super().schedule(state)
        if self.how == "none":
            return None
        if self.how == "twice" and batch.scheduled:
            batch.scheduled.append(batch.scheduled[-1])
        if self.how == "too_many_tokens" and batch.scheduled:
            batch.scheduled[-1].num_new_tokens += 1
        if self.how == "not_admitted" and state.waiting:
            batch.add(state.waiting[-1], 1)
        return batch


class FlakyAllocator:
    """A real allocator whose block tables get tampered with at one allocate call."""

    def __init__(self, inner, how: str, at_call: int) -> None:
        self.inner, self.how, self.at_call, self.num_calls, self.last = inner, how, at_call, 0, None
        self.num_blocks, self.block_size = inner.num_blocks, inner.block_size

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def num_free_blocks(self):
        return self.inner.num_free_blocks

    def allocate(self, seq, num_tokens):
        hit = self.inner.allocate(seq, num_tokens)
        self.num_calls += 1
        if self.num_calls == self.at_call and self.last is not None and self.last.block_table:
            if self.how == "out_of_range":
                seq.block_table[0] = self.num_blocks + 3
            elif self.how == "shared":
                seq.block_table[0] = self.last.block_table[0]
        self.last = seq
        return hit


from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FAULTS = [
    None,
    "hook",
    ("scheduler", "raise"),
    ("scheduler", "none"),
    ("scheduler", "twice"),
    ("scheduler", "too_many_tokens"),
    ("scheduler", "not_admitted"),
    ("scheduler", "stall"),
    ("allocator", "out_of_range"),
    ("allocator", "shared"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=str)
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_workloads_with_faults_keep_every_invariant(tiny, fault, data):
    allocator_name = data.draw(
        st.sampled_from(["paged", "contiguous", "buddy", "prefix"]), label="allocator"
    )
    block_size = data.draw(st.sampled_from([1, 4, 16]), label="block_size")
    num_requests = data.draw(st.integers(2, 10), label="num_requests")
    specs = [
        (
            data.draw(st.integers(1, 24), label="prompt_len"),
            data.draw(st.integers(1, 12), label="max_tokens"),
            data.draw(st.integers(0, 4), label="arrival_step"),
            data.draw(st.one_of(st.none(), st.integers(0, 30)), label="cancel_step"),
        )
        for _ in range(num_requests)
    ]
    rng = np.random.default_rng(len(specs))
    token_prompts = [[int(t) for t in rng.integers(0, 256, p)] for p, _, _, _ in specs]
    if allocator_name == "prefix":  # shared heads, so the cache hits and blocks are shared
        head = token_prompts[0][:8]
        token_prompts = [head + p if i % 2 else p for i, p in enumerate(token_prompts)]
        specs = [(len(tp), *spec[1:]) for tp, spec in zip(token_prompts, specs, strict=True)]
    largest = max(p + m for p, m, _, _ in specs)
    min_blocks = -(-largest // block_size)
    # Tight arenas: growing requests must preempt each other.
    num_blocks = min_blocks + data.draw(st.integers(0, min_blocks // 2), label="extra_blocks")
    budget = data.draw(st.sampled_from([8, 32, 2048]), label="max_num_batched_tokens")
    at = data.draw(st.integers(1, 12), label="fault_at")
    samples = [data.draw(st.sampled_from([1, 1, 2, 3]), label="n") for _ in specs]
    params = [
        cl.SamplingParams(max_tokens=m, ignore_eos=True, n=n)
        for (_, m, _, _), n in zip(specs, samples, strict=True)
    ]
    reference = [r.token_ids for r in cl.Engine(tiny).generate(token_prompts, params)]

    scheduler = FCFSScheduler()
    allocator = cl.kv.allocators.create(
        allocator_name, num_blocks=num_blocks, block_size=block_size
    )
    if fault and fault[0] == "scheduler":
        scheduler = FlakyScheduler(fault[1], at)
    if fault and fault[0] == "allocator":
        allocator = FlakyAllocator(allocator, fault[1], at)
    engine = cl.Engine(
        tiny,
        scheduler=scheduler,
        allocator=allocator,
        max_num_seqs=4,
        max_num_batched_tokens=budget,
        stall_timeout=0.02,
    )
    if fault == "hook":
        engine.add_hook("request.*", raising())
    submitted: list = [None] * num_requests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        deadline = time.perf_counter() + 30
        for step in itertools.count():
            for i, (_, _, arrival, cancel) in enumerate(specs):
                if arrival == step:
                    submitted[i] = engine.submit(token_prompts[i], params[i])
                if cancel == step and submitted[i] is not None:
                    engine.cancel(submitted[i])
            if step > 8 and not engine.has_unfinished or time.perf_counter() > deadline:
                break
            try:
                engine.step()
            except cl.guard.EngineError:
                pass
    assert not engine.has_unfinished, "the run must end"
    # Greedy: every parallel sample of a request has the request's reference tokens.
    submitted = [s for r in submitted for s in r.samples]
    expected = [ref for p, ref in zip(params, reference, strict=True) for _ in range(p.n)]
    for request, ref in zip(submitted, expected, strict=True):
        assert request.is_finished, request
        if request.state is RequestState.FINISHED:
            assert request.output_token_ids == ref, "a finished request has exact tokens"
        elif request.state is RequestState.FAILED:
            assert fault is not None and request.exception is not None
        else:
            assert request.state is RequestState.CANCELLED
            assert ref[: request.num_output_tokens] == request.output_token_ids
    if fault is None or fault == "hook":
        assert all(r.state is not RequestState.FAILED for r in submitted)
    event(f"fault {fault}: {'some' if any(r.exception for r in submitted) else 'no'} failures")
    event(f"preemptions: {'yes' if any(r.num_preemptions for r in submitted) else 'no'}")
    inner = getattr(allocator, "inner", allocator)
    assert inner.num_free_blocks == inner.num_blocks and inner.usage().num_sequences == 0
    assert not engine.state.running and not engine.state.waiting
    # Usable afterwards, with the fault gone.
    if isinstance(scheduler, FlakyScheduler):
        scheduler.how = None
    if isinstance(allocator, FlakyAllocator):
        allocator.at_call = -1
    again = engine.generate(token_prompts[:2], params[:2])
    assert [r.token_ids for r in again] == reference[:2]
