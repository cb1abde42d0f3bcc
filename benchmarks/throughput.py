"""Offline throughput: cortexlab's engine vs mlx-lm's `BatchGenerator`, one process, one model.

Four measurements on fixed, seeded workloads (greedy, EOS ignored, same batch limits):

1. end-to-end: varied chat prompts (~30..400 tokens) and output lengths (16..96 tokens);
   generated and total tokens/s, plus a token-for-token check of the greedy outputs;
2. decode-only: short prompts, long outputs, timing only the steps with no prefill work;
3. prefill-only: long prompts, max_tokens=1, prompt tokens/s;
4. engine overhead per step on `tiny-random`, where the model is nearly free, so what is left
   is the engine's own host-side work;
5. per context (64 / 400 / 1,500 tokens): prefill of one prompt and a batch-16 decode step
   through the engine against a bare mlx-lm forward of the same tokens, interleaved, best of N.

    python benchmarks/throughput.py [--quick] [--json PATH] [--repeats N] [--profile]

Timings on a shared CPU are noisy; `--repeats N` keeps each side's best of N runs.
"""

# cortexlab must be imported before mlx: it loads the fast BLAS that MLX then binds to.
import cortexlab as cl  # noqa: I001

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

# Shared batch limits, equal in name more than in effect: cortexlab's max_num_batched_tokens
# caps a whole step's tokens, mlx-lm's prefill_step_size caps each prompt's chunk (so 8 prompts
# of 400 tokens go through one 3,200-token forward). mlx-lm's prefill_batch_size has no cortexlab
# counterpart (the token budget decides how many prompts join a step); we keep its default.
MAX_NUM_SEQS = 32
MAX_NUM_BATCHED_TOKENS = 2048
PREFILL_BATCH_SIZE = 8
BLOCK_SIZE = 16

WORDS = (
    "the quick brown fox jumps over a lazy dog near river mountain city light music garden "
    "window paper silver market winter summer ocean forest bridge story engine memory signal "
    "planet number orange yellow purple table chair coffee morning evening teacher student "
    "doctor library museum travel simple random gentle bright quiet history science water "
    "stone cloud green house road friend question answer why how when where explain describe"
).split()


@dataclass(frozen=True)
class Sizes:
    """Every workload dimension; `QUICK` shrinks them for a smoke run."""

    e2e_requests: int = 32
    e2e_prompt: tuple[int, int] = (32, 400)
    e2e_output: tuple[int, int] = (16, 96)
    decode_requests: int = 16
    decode_prompt: int = 32
    decode_tokens: int = 64
    prefill_requests: int = 8
    prefill_prompt: int = 400
    tiny_requests: int = 32
    tiny_prompt: int = 8
    tiny_tokens: int = 64
    ctx_contexts: tuple[int, ...] = (64, 400, 1500)
    ctx_batch: int = 16
    ctx_decode_steps: int = 16  # timed decode steps per run at contexts below 1,000
    ctx_long_decode_steps: int = 8  # ... and at 1,000 or more, where each step costs more
    ctx_prefill_repeats: int = 5
    ctx_decode_repeats: int = 3  # windows of decode steps after one prefill per side


FULL = Sizes()
QUICK = Sizes(
    8,
    (32, 160),
    (8, 24),
    8,
    32,
    16,
    4,
    200,
    16,
    8,
    16,
    ctx_contexts=(64, 400),
    ctx_decode_steps=8,
    ctx_long_decode_steps=4,
    ctx_prefill_repeats=3,
    ctx_decode_repeats=2,
)


@dataclass
class Run:
    """One pass of a workload through one engine."""

    wall: float
    outputs: list[list[int]]
    num_prompt_tokens: int
    num_steps: int  # cortexlab steps or mlx-lm `next()` calls
    decode_time: float  # steps/calls that did no prefill work
    decode_tokens: int
    num_decode_steps: int
    extra: dict = field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return sum(len(o) for o in self.outputs)


# -- workload --------------------------------------------------------------------------------
def chat_prompt(tokenizer, words: list[str]) -> list[int]:
    messages = [{"role": "user", "content": " ".join(words)}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def build_prompts(tokenizer, rng: np.random.Generator, lengths) -> list[list[int]]:
    """Chat prompts whose rendered token counts come as close to `lengths` as whole words allow."""
    prompts = []
    for target in lengths:
        # Every word is at least one token, so `target` words always overshoot.
        words = rng.choice(WORDS, size=int(target)).tolist()
        lo, hi = 1, len(words)  # binary search: the most words whose rendering fits `target`
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(chat_prompt(tokenizer, words[:mid])) <= target:
                lo = mid
            else:
                hi = mid - 1
        prompts.append(chat_prompt(tokenizer, words[:lo]))
    return prompts


# -- the two engines -------------------------------------------------------------------------
def make_engine(model) -> cl.Engine:
    return cl.Engine(
        model,
        scheduler="fcfs",
        allocator="paged",
        block_size=BLOCK_SIZE,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    )


def run_cortexlab(engine: cl.Engine, prompts: list[list[int]], max_tokens: list[int]) -> Run:
    params = [cl.SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens]
    trace = cl.Trace()
    with engine.hooks(trace.hooks):
        t0 = time.perf_counter()
        requests = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        engine.run_until_done()
        wall = time.perf_counter() - t0
    steps = trace.steps
    decode = steps[steps["num_prefill_seqs"] == 0]
    return Run(
        wall=wall,
        outputs=[list(r.output_token_ids) for r in requests],
        num_prompt_tokens=sum(r.num_prompt_tokens for r in requests),
        num_steps=len(steps),
        decode_time=float(decode["duration"].sum()),
        decode_tokens=int(decode["num_generated_tokens"].sum()),
        num_decode_steps=len(decode),
        extra={"num_preempted": int(steps["num_preempted"].sum())},
    )


def run_mlx_lm(module, prompts: list[list[int]], max_tokens: list[int]) -> Run:
    gen = BatchGenerator(
        module,
        max_tokens=max(max_tokens),
        stop_tokens=None,  # no stop sequences: every request runs to its own max_tokens
        sampler=None,  # greedy
        completion_batch_size=MAX_NUM_SEQS,
        prefill_batch_size=PREFILL_BATCH_SIZE,
        prefill_step_size=MAX_NUM_BATCHED_TOKENS,
    )
    calls = []  # (seconds, did prefill work, tokens generated)
    with gen.stats() as stats:
        t0 = time.perf_counter()
        uids = gen.insert(prompts, max_tokens=list(max_tokens))
        outputs: dict[int, list[int]] = {uid: [] for uid in uids}
        left = len(uids)
        while left:
            c0 = time.perf_counter()
            prompt_responses, generation_responses = gen.next()
            # Keep counts only: responses hold logprob views that pin each step's [B, V] array.
            calls.append(
                (time.perf_counter() - c0, bool(prompt_responses), len(generation_responses))
            )
            for r in generation_responses:
                outputs[r.uid].append(r.token)
                left -= r.finish_reason is not None
        wall = time.perf_counter() - t0
    # GenerationBatch pipelines one step ahead, so a forward for the step after the last is
    # still in flight: every output is already here, but the next measurement must not pay it.
    mx.synchronize(gen.stream)
    gen.close()
    decode = [(t, n) for t, had_prompt, n in calls if not had_prompt]
    return Run(
        wall=wall,
        outputs=[outputs[uid] for uid in uids],
        num_prompt_tokens=sum(len(p) for p in prompts),
        num_steps=len(calls),
        decode_time=sum(t for t, _ in decode),
        decode_tokens=sum(n for _, n in decode),
        num_decode_steps=len(decode),
        extra={
            "stats": {
                "prompt_tokens": stats.prompt_tokens,
                "prompt_time": stats.prompt_time,
                "generation_tokens": stats.generation_tokens,
                "decode_time": stats.decode_time,
                "wall_time": stats.wall_time,
            }
        },
    )


def best_of(repeats: int, fn: Callable[[], Run], key: Callable[[Run], float]) -> Run:
    """The fastest of `repeats` runs (outputs are deterministic, so any run's are the same)."""
    return min((fn() for _ in range(repeats)), key=key)


def compare(a: list[list[int]], b: list[list[int]]) -> list[tuple[int, int, int]]:
    """(request, tokens equal before the first divergence, length) for each differing pair."""
    diffs = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            pairs = enumerate(zip(x, y, strict=False))
            same = next((k for k, (u, v) in pairs if u != v), min(len(x), len(y)))
            diffs.append((i, same, max(len(x), len(y))))
    return diffs


def correctness_line(a: list[list[int]], b: list[list[int]]) -> tuple[str, int]:
    diffs = compare(a, b)
    line = f"greedy tokens identical: {len(a) - len(diffs)}/{len(a)} requests"
    for i, same, n in diffs:
        line += f"\n  request {i}: first {same}/{n} tokens match, then diverge"
    return line, len(diffs)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# -- engine overhead on tiny-random ----------------------------------------------------------
def drive(engine: cl.Engine, prompts, max_tokens) -> tuple[list[float], list[bool]]:
    """Step the engine to completion without hooks; per-step seconds and is-pure-decode flags."""
    requests = [
        engine.submit(p, cl.SamplingParams(max_tokens=m, ignore_eos=True))
        for p, m in zip(prompts, max_tokens, strict=True)
    ]
    times, is_decode = [], []
    while engine.has_unfinished:
        # Checked before the step (outside its timing): has every prompt been prefilled?
        decode = all(r.num_computed_tokens >= r.num_prompt_tokens for r in requests)
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        is_decode.append(decode)
    return times, is_decode


@contextlib.contextmanager
def instrumented(engine: cl.Engine):
    """Split each step's forward into graph build (plan_forward inside it) and a forced eval,
    and time sampling with its own eval; the engine's own sync then has nothing left to do."""
    runner_mod = sys.modules["cortexlab.runner"]
    probe: dict[str, list[float]] = {"build": [], "plan": [], "eval": [], "sample": []}
    orig_plan = runner_mod.plan_forward
    orig_forward, orig_sample = engine.runner.forward, engine.sampler.sample
    plan_time = [0.0]

    def plan_forward(*args, **kwargs):
        t0 = time.perf_counter()
        out = orig_plan(*args, **kwargs)
        plan_time[0] += time.perf_counter() - t0
        return out

    def forward(rows):
        plan_time[0] = 0.0
        t0 = time.perf_counter()
        logits = orig_forward(rows)
        t1 = time.perf_counter()
        mx.eval(logits, *engine.arena.arrays)
        probe["build"].append(t1 - t0)
        probe["plan"].append(plan_time[0])
        probe["eval"].append(time.perf_counter() - t1)
        return logits

    def sample(*args, **kwargs):
        t0 = time.perf_counter()
        sampled = orig_sample(*args, **kwargs)
        mx.eval(*sampled.arrays)
        probe["sample"].append(time.perf_counter() - t0)
        return sampled

    runner_mod.plan_forward = plan_forward
    engine.runner.forward, engine.sampler.sample = forward, sample
    try:
        yield probe
    finally:
        runner_mod.plan_forward = orig_plan
        del engine.runner.forward  # back to the class's method
        del engine.sampler.sample


def bare_decode_step(module, batch: int, prompt: int, steps: int) -> float:
    """Seconds per synchronous greedy decode step of a plain mlx-lm KVCache batch, over the
    same contexts as the engine's decode steps (`prompt` tokens, then `steps` more)."""
    cache = make_prompt_cache(module)
    tokens = mx.array(np.random.default_rng(3).integers(0, 256, (batch, prompt), dtype=np.int32))
    y = mx.argmax(module(tokens, cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(module(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        y.tolist()  # the engine also brings each step's tokens to Python
    return (time.perf_counter() - t0) / steps


def engine_overhead(sizes: Sizes, repeats: int, profile: bool) -> dict:
    tiny = cl.load_model("tiny-random")
    engine = make_engine(tiny)
    rng = np.random.default_rng(4)
    prompts = rng.integers(0, 256, (sizes.tiny_requests, sizes.tiny_prompt)).tolist()
    max_tokens = [sizes.tiny_tokens] * sizes.tiny_requests
    drive(engine, prompts[:4], [4] * 4)  # warm-up

    def mean_decode(times, flags):
        return float(np.mean([t for t, d in zip(times, flags, strict=True) if d]))

    def instrumented_run() -> dict[str, float]:
        with instrumented(engine) as probe:
            times, flags = drive(engine, prompts, max_tokens)
        d = np.asarray(flags)
        part = {k: float(np.mean(np.asarray(v)[d])) for k, v in probe.items()}
        part["step"] = float(np.mean(np.asarray(times)[d]))
        part["num_steps"], part["num_decode_steps"] = len(times), int(d.sum())
        return part

    # Each run is short, so a few extra tries to dodge scheduler noise cost little.
    tries = max(3, repeats)
    plain = min(mean_decode(*drive(engine, prompts, max_tokens)) for _ in range(tries))
    part = min((instrumented_run() for _ in range(tries)), key=lambda p: p["step"])
    bare = min(
        bare_decode_step(tiny.module, sizes.tiny_requests, sizes.tiny_prompt, sizes.tiny_tokens - 1)
        for _ in range(tries)
    )
    mlx_run = best_of(
        tries,
        lambda: run_mlx_lm(tiny.module, prompts, max_tokens),
        key=lambda r: r.decode_time / max(1, r.num_decode_steps),
    )
    mlx_step = mlx_run.decode_time / max(1, mlx_run.num_decode_steps)
    out = {
        "requests": sizes.tiny_requests,
        "prompt_tokens": sizes.tiny_prompt,
        "output_tokens": sizes.tiny_tokens,
        "num_steps": part.pop("num_steps"),
        "num_decode_steps": part.pop("num_decode_steps"),
        "mean_decode_step_us": plain * 1e6,
        "bare_decode_step_us": bare * 1e6,
        "overhead_vs_bare_us": (plain - bare) * 1e6,
        "instrumented_us": {k: v * 1e6 for k, v in part.items()},
        "overhead_outside_forward_sample_us": (
            part["step"] - part["build"] - part["eval"] - part["sample"]
        )
        * 1e6,
        "host_side_us": (part["step"] - part["eval"]) * 1e6,
        "mlx_lm_decode_call_us": mlx_step * 1e6,
    }
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        drive(engine, prompts, max_tokens)
        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(18)
        out["profile"] = buf.getvalue()
    return out


# -- prefill and decode per context against a bare mlx-lm forward ----------------------------
def context_prompts(model, rng: np.random.Generator, n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids (drawn from the model's vocabulary)."""
    high = min(int(model.vocab_size), 32000)
    return rng.integers(100, high, (n, length)).tolist()


def engine_prefill(model, prompt: list[int]) -> float:
    """Seconds of the steps that process one prompt (max_tokens=1) on a fresh engine."""
    engine = make_engine(model)
    times, _ = drive(engine, [prompt], [1])
    return float(sum(times))


def bare_prefill(module, prompt: list[int]) -> float:
    """Seconds for mlx-lm's usual prefill: the prompt in prefill_step_size chunks through a
    fresh make_prompt_cache, each chunk evaluated, then the last position's greedy token."""
    cache = make_prompt_cache(module)
    tokens = mx.array(prompt, dtype=mx.int32)[None]
    t0 = time.perf_counter()
    for start in range(0, len(prompt), MAX_NUM_BATCHED_TOKENS):
        logits = module(tokens[:, start : start + MAX_NUM_BATCHED_TOKENS], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    y = mx.argmax(logits[:, -1], axis=-1)
    y.item()
    return time.perf_counter() - t0


def interleaved_decode(
    engine: cl.Engine, module, prompts: list[list[int]], steps: int, windows: int
) -> tuple[list[float], list[float]]:
    """Prefill `prompts` once on each side (untimed), then alternate `windows` windows of
    `steps` decode steps: engine.step() vs bare KVCache forward + argmax + sync. Mean seconds
    per step of each window, per side; window w runs at contexts len + w*steps on both."""
    batch, length = len(prompts), len(prompts[0])
    params = cl.SamplingParams(max_tokens=1 + steps * windows, ignore_eos=True)
    requests = [engine.submit(p, params) for p in prompts]
    while not all(r.num_computed_tokens >= r.num_prompt_tokens for r in requests):
        engine.step()
    cache = make_prompt_cache(module)
    arr = mx.array(np.asarray(prompts, dtype=np.int32))
    width = max(1, MAX_NUM_BATCHED_TOKENS // batch)  # the engine's token budget per forward
    for start in range(0, length, width):
        logits = module(arr[:, start : start + width], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    y = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(y)
    eng, bare = [], []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        eng.append((time.perf_counter() - t0) / steps)
        t0 = time.perf_counter()
        for _ in range(steps):
            y = mx.argmax(module(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(y)
            y.tolist()  # the engine also brings each step's tokens to Python
        bare.append((time.perf_counter() - t0) / steps)
    engine.run_until_done()
    return eng, bare


def per_context(model, sizes: Sizes, repeats: int) -> dict:
    """Engine vs bare mlx-lm per context, the two sides interleaved in each repeat."""
    module, batch = model.module, sizes.ctx_batch
    # Room for every request's whole context, so no decode step is ever a preemption.
    most_steps = max(sizes.ctx_decode_steps, sizes.ctx_long_decode_steps)
    longest = max(sizes.ctx_contexts) + 1 + most_steps * max(repeats, sizes.ctx_decode_repeats)
    kv_bytes = max(1 << 30, 2 * batch * longest * model.kv_bytes_per_token)
    decoder = cl.Engine(
        model,
        scheduler="fcfs",
        allocator="paged",
        block_size=BLOCK_SIZE,
        kv_memory_bytes=kv_bytes,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
    )
    rng = np.random.default_rng(5)
    warm = context_prompts(model, rng, 1, 32)[0]
    engine_prefill(model, warm)  # warm-up, both sides
    bare_prefill(module, warm)
    out: dict = {"batch": batch, "prefill": [], "decode": []}
    for ctx in sizes.ctx_contexts:
        prompt = context_prompts(model, rng, 1, ctx)[0]
        eng, bare = [], []
        for _ in range(max(repeats, sizes.ctx_prefill_repeats)):
            eng.append(engine_prefill(model, prompt))
            bare.append(bare_prefill(module, prompt))
        out["prefill"].append(
            {
                "context": ctx,
                "engine_ms": 1e3 * min(eng),
                "bare_ms": 1e3 * min(bare),
                "ratio": ratio(min(eng), min(bare)),
                "repeats": len(eng),
            }
        )
    for ctx in sizes.ctx_contexts:
        # Prefill dominates a long context's cost, so each side prefills once and the repeats
        # are windows of decode steps, alternating engine and bare.
        steps = sizes.ctx_decode_steps if ctx < 1000 else sizes.ctx_long_decode_steps
        windows = max(repeats, sizes.ctx_decode_repeats)
        prompts = context_prompts(model, rng, batch, ctx)
        eng, bare = interleaved_decode(decoder, module, prompts, steps, windows)
        out["decode"].append(
            {
                "context": ctx,
                "engine_ms": 1e3 * min(eng),
                "bare_ms": 1e3 * min(bare),
                "ratio": ratio(min(eng), min(bare)),
                "timed_steps": steps,
                "repeats": windows,
            }
        )
    return out


# -- reporting -------------------------------------------------------------------------------
def table(rows: list[list]) -> str:
    """Plain-text table: first row is the header, first column left-aligned."""
    cells = [[f"{c:,.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def summary(run: Run) -> dict:
    return {
        "wall_s": run.wall,
        "num_prompt_tokens": run.num_prompt_tokens,
        "num_generated_tokens": run.num_generated,
        "num_steps": run.num_steps,
        "generated_tok_s": run.num_generated / run.wall,
        "total_tok_s": (run.num_prompt_tokens + run.num_generated) / run.wall,
        "prompt_tok_s": run.num_prompt_tokens / run.wall,
        "decode_s": run.decode_time,
        "decode_tokens": run.decode_tokens,
        "num_decode_steps": run.num_decode_steps,
        "decode_tok_s": ratio(run.decode_tokens, run.decode_time),
        **run.extra,
    }


def span(prompts: list[list[int]]) -> str:
    n = [len(p) for p in prompts]
    return f"{min(n)}..{max(n)} tokens (sum {sum(n):,})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--repeats", type=int, default=1, help="keep each side's best of N runs")
    parser.add_argument("--profile", action="store_true", help="cProfile the tiny-random run")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    repeats = max(1, args.repeats)

    info = cl.info()
    print(
        f"device {info['device']} | {info['blas']} | fp32 matmul "
        f"{info['fp32_matmul_gflops']} GFLOP/s | {info['cpu_count']} CPUs | "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    print(f"mlx {info['mlx']} | mlx-lm {info['mlx-lm']} | cortexlab {info['cortexlab']}")
    cl.seed(0)
    model = cl.load_model()
    tokenizer, module = model.tokenizer, model.module
    engine = make_engine(model)
    print(
        f"model {model.name} ({str(model.dtype).removeprefix('mlx.core.')}); limits: "
        f"max_num_seqs = completion_batch_size = {MAX_NUM_SEQS}, max_num_batched_tokens = "
        f"prefill_step_size = {MAX_NUM_BATCHED_TOKENS}, mlx-lm prefill_batch_size = "
        f"{PREFILL_BATCH_SIZE} (its default); cortexlab fcfs + paged, block_size {BLOCK_SIZE}; "
        f"greedy, EOS ignored; best of {repeats}"
    )
    print(
        "note: max_num_batched_tokens caps all tokens of a cortexlab step; prefill_step_size "
        "caps each prompt's chunk in an mlx-lm prefill batch"
    )
    results: dict = {
        "info": info,
        "quick": args.quick,
        "sizes": asdict(sizes),
        "repeats": repeats,
        "limits": {
            "max_num_seqs": MAX_NUM_SEQS,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
            "prefill_batch_size": PREFILL_BATCH_SIZE,
            "block_size": BLOCK_SIZE,
        },
    }

    # Warm-up: first calls pay for allocations and thread-pool start-up on both sides.
    warm = build_prompts(tokenizer, np.random.default_rng(9), [48, 200, 120])
    run_cortexlab(engine, warm, [4, 4, 4])
    run_mlx_lm(module, warm, [4, 4, 4])

    # 1. End-to-end.
    rng = np.random.default_rng(0)
    lengths = rng.integers(sizes.e2e_prompt[0], sizes.e2e_prompt[1] + 1, sizes.e2e_requests)
    outputs = rng.integers(sizes.e2e_output[0], sizes.e2e_output[1] + 1, sizes.e2e_requests)
    prompts = build_prompts(tokenizer, rng, lengths)
    outputs = outputs.tolist()
    cx = best_of(repeats, lambda: run_cortexlab(engine, prompts, outputs), key=lambda r: r.wall)
    ml = best_of(repeats, lambda: run_mlx_lm(module, prompts, outputs), key=lambda r: r.wall)
    print(
        f"\n1. end-to-end: {len(prompts)} chat requests, prompts {span(prompts)}, "
        f"outputs {min(outputs)}..{max(outputs)} tokens (sum {sum(outputs):,})"
    )
    rows = [["engine", "prompt tok", "gen tok", "wall s", "gen tok/s", "total tok/s", "steps"]]
    for name, r in (("cortexlab", cx), ("mlx-lm", ml)):
        total = r.num_prompt_tokens + r.num_generated
        rows.append(
            [
                name,
                r.num_prompt_tokens,
                r.num_generated,
                r.wall,
                r.num_generated / r.wall,
                total / r.wall,
                r.num_steps,
            ]
        )
    gen_ratio = ratio(cx.num_generated / cx.wall, ml.num_generated / ml.wall)
    total_ratio = ratio(
        (cx.num_prompt_tokens + cx.num_generated) / cx.wall,
        (ml.num_prompt_tokens + ml.num_generated) / ml.wall,
    )
    rows.append(["cortexlab/mlx-lm", "", "", "", f"{gen_ratio:.2f}x", f"{total_ratio:.2f}x", ""])
    print(table(rows))
    line, num_diff = correctness_line(cx.outputs, ml.outputs)
    print(line)
    if cx.extra["num_preempted"]:
        print(f"note: cortexlab preempted {cx.extra['num_preempted']} times")
    results["end_to_end"] = {
        "cortexlab": summary(cx),
        "mlx_lm": summary(ml),
        "ratio_generated_tok_s": gen_ratio,
        "ratio_total_tok_s": total_ratio,
        "num_requests_differing": num_diff,
        "differences": compare(cx.outputs, ml.outputs),
    }

    # 2. Decode-only: the rate once every prompt is in the batch.
    rng = np.random.default_rng(1)
    n = sizes.decode_requests
    prompts = build_prompts(tokenizer, rng, [sizes.decode_prompt] * n)
    outputs = [sizes.decode_tokens] * n
    cx = best_of(repeats, lambda: run_cortexlab(engine, prompts, outputs), lambda r: r.decode_time)
    ml = best_of(repeats, lambda: run_mlx_lm(module, prompts, outputs), lambda r: r.decode_time)
    print(
        f"\n2. decode-only: {n} requests, prompts {span(prompts)}, {sizes.decode_tokens} tokens "
        "each; only steps with no prefill work are timed (cortexlab: trace steps with "
        "num_prefill_seqs == 0; mlx-lm: next() calls with no prompt responses)"
    )
    rows = [["engine", "decode steps", "decode tok", "decode s", "decode tok/s", "ms/step"]]
    for name, r in (("cortexlab", cx), ("mlx-lm", ml)):
        rows.append(
            [
                name,
                r.num_decode_steps,
                r.decode_tokens,
                r.decode_time,
                r.decode_tokens / r.decode_time,
                1e3 * r.decode_time / r.num_decode_steps,
            ]
        )
    decode_ratio = ratio(cx.decode_tokens / cx.decode_time, ml.decode_tokens / ml.decode_time)
    rows.append(["cortexlab/mlx-lm", "", "", "", f"{decode_ratio:.2f}x", ""])
    print(table(rows))
    print(correctness_line(cx.outputs, ml.outputs)[0])
    results["decode_only"] = {
        "cortexlab": summary(cx),
        "mlx_lm": summary(ml),
        "ratio_decode_tok_s": decode_ratio,
        "num_requests_differing": len(compare(cx.outputs, ml.outputs)),
    }

    # 3. Prefill-only: long prompts and one output token (that token's forward included).
    rng = np.random.default_rng(2)
    n = sizes.prefill_requests
    prompts = build_prompts(tokenizer, rng, [sizes.prefill_prompt] * n)
    outputs = [1] * n
    cx = best_of(repeats, lambda: run_cortexlab(engine, prompts, outputs), lambda r: r.wall)
    ml = best_of(repeats, lambda: run_mlx_lm(module, prompts, outputs), lambda r: r.wall)
    print(f"\n3. prefill-only: {n} requests, prompts {span(prompts)}, max_tokens=1")
    rows = [["engine", "prompt tok", "wall s", "prompt tok/s", "steps"]]
    for name, r in (("cortexlab", cx), ("mlx-lm", ml)):
        rows.append([name, r.num_prompt_tokens, r.wall, r.num_prompt_tokens / r.wall, r.num_steps])
    rows.append(["cortexlab/mlx-lm", "", "", f"{ml.wall / cx.wall:.2f}x", ""])
    print(table(rows))
    print(correctness_line(cx.outputs, ml.outputs)[0])
    results["prefill_only"] = {
        "cortexlab": summary(cx),
        "mlx_lm": summary(ml),
        "ratio_prompt_tok_s": ml.wall / cx.wall,
        "num_requests_differing": len(compare(cx.outputs, ml.outputs)),
    }

    # 4. Engine overhead where the model costs almost nothing.
    ov = engine_overhead(sizes, repeats, args.profile)
    us = ov["instrumented_us"]
    print(
        f"\n4. engine overhead on tiny-random: {ov['requests']} requests x "
        f"{ov['prompt_tokens']}-token prompts x {ov['output_tokens']} tokens "
        f"({ov['num_steps']} steps, {ov['num_decode_steps']} pure decode); us per decode step"
    )
    print(
        table(
            [
                ["measure", "us/step"],
                ["cortexlab engine.step(), no hooks", ov["mean_decode_step_us"]],
                [f"bare mlx-lm forward+argmax+sync, B={ov['requests']}", ov["bare_decode_step_us"]],
                ["  -> engine overhead vs bare forward", ov["overhead_vs_bare_us"]],
                ["instrumented engine.step()", us["step"]],
                ["  runner.forward graph build", us["build"]],
                ["    of which plan_forward", us["plan"]],
                ["  forward mx.eval (the compute)", us["eval"]],
                ["  sample + its eval", us["sample"]],
                [
                    "  -> rest: schedule, bookkeeping, detokenize",
                    ov["overhead_outside_forward_sample_us"],
                ],
                ["  -> all host-side Python (step - eval)", ov["host_side_us"]],
                ["mlx-lm BatchGenerator decode next()", ov["mlx_lm_decode_call_us"]],
            ]
        )
    )
    if args.profile:
        print("\ncProfile of one tiny-random engine run (by own time):")
        print(ov["profile"])
    results["engine_overhead"] = ov

    # 5. Prefill and decode per context against a bare mlx-lm forward of the same batch.
    pc = per_context(model, sizes, repeats)
    print(
        "\n5. per context vs bare mlx-lm, interleaved, best of N: prefill = one prompt "
        "(max_tokens=1) on a fresh engine vs module forward in prefill_step_size chunks + "
        f"argmax; decode = ms per step of a batch of {pc['batch']} at that context, after "
        "both sides prefilled it once, in alternating windows of steps, vs a KVCache batch "
        "forward + argmax + sync"
    )
    for kind in ("prefill", "decode"):
        rows = [["context", f"{kind}: engine ms", "bare ms", "engine/bare", "runs"]]
        for r in pc[kind]:
            label = f"{r['context']:,}"
            if kind == "decode":
                label += f" ({r['timed_steps']} steps x {r['repeats']})"
            rows.append([label, r["engine_ms"], r["bare_ms"], f"{r['ratio']:.2f}x", r["repeats"]])
        print(table(rows))
    results["per_context"] = pc

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    # A real bug shows as many divergent requests; a near-tie flip now and then is tolerated.
    if num_diff > sizes.e2e_requests // 4:
        print(f"FAIL: {num_diff} of {sizes.e2e_requests} end-to-end requests diverge")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
