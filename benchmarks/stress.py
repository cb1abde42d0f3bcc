"""Stress: 10,000 random requests per configuration, with preemption and cancels; leaks, speed,
and what the policy guard costs.

For each allocator x block size, a tiny-random engine with an arena small enough to preempt
takes `--num-requests` requests (prompts 1..64 tokens, half behind one of four shared
32-token heads, outputs 1..32, 10% with 2-3 parallel samples, arrivals spread over the
run, 5% cancelled at a random later step) and runs them to completion twice: with the
policy guard on (the default) and off. It prints requests/s, preemptions, cancels, the
guard's time per step, and checks that every request ended, every block came back, and
every finished request generated the same (greedy) tokens under every configuration.

    python benchmarks/stress.py [--num-requests N] [--seed S]

Exits with status 1 on any leak, unfinished request or token mismatch.
"""

# cortexlab must be imported before mlx: it loads the fast BLAS that MLX then binds to.
import cortexlab as cl  # noqa: I001

import argparse
import sys
import time

import cortexlab.engine as engine_module
import numpy as np

CONFIGS = [
    ("paged", 4, 200),
    ("paged", 16, 50),
    ("contiguous", 4, 200),
    ("contiguous", 16, 50),
    ("buddy", 4, 200),
    ("buddy", 16, 50),
    ("prefix", 4, 200),
    ("prefix", 16, 50),
]


def workload(num_requests: int, seed: int):
    """Prompts, params, arrival steps and cancel steps (or -1), all seeded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 65, num_requests)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]
    # Half the prompts start with one of four shared heads, so the prefix cache hits.
    heads = [[int(t) for t in rng.integers(0, 256, 32)] for _ in range(4)]
    for i in np.flatnonzero(rng.random(num_requests) < 0.5):
        prompts[i] = heads[i % 4] + prompts[i]
    # One request in ten asks for 2 or 3 parallel samples (forks sharing the prompt).
    samples = np.where(rng.random(num_requests) < 0.1, rng.integers(2, 4, num_requests), 1)
    params = [
        cl.SamplingParams(max_tokens=int(m), ignore_eos=True, n=int(n))
        for m, n in zip(rng.integers(1, 33, num_requests), samples, strict=True)
    ]
    # About four new requests per step, so queues stay full and preemption keeps happening.
    arrivals = np.sort(rng.integers(0, max(1, num_requests // 4), num_requests))
    cancels = np.where(
        rng.random(num_requests) < 0.05, arrivals + rng.integers(0, 40, num_requests), -1
    )
    return prompts, params, arrivals, cancels


class GuardTimer:
    """Wraps the engine's guard functions to add up the time spent in them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._originals = (engine_module.check_batch, engine_module.check_block_tables)

    def __enter__(self) -> "GuardTimer":
        def timed(fn):
            def wrapper(*args):
                t0 = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    self.seconds += time.perf_counter() - t0

            return wrapper

        engine_module.check_batch, engine_module.check_block_tables = map(timed, self._originals)
        return self

    def __exit__(self, *exc) -> None:
        engine_module.check_batch, engine_module.check_block_tables = self._originals


def run(model, allocator: str, block_size: int, num_blocks: int, work, check: bool) -> dict:
    prompts, params, arrivals, cancels = work
    engine = cl.Engine(
        model,
        allocator=allocator,
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_seqs=32,
        max_num_batched_tokens=512,
        check_policies=check,
    )
    by_step: dict[int, list[int]] = {}
    for i, a in enumerate(arrivals):
        by_step.setdefault(int(a), []).append(i)
    cancel_at: dict[int, list[int]] = {}
    for i, c in enumerate(cancels):
        if c >= 0:
            cancel_at.setdefault(int(c), []).append(i)
    requests: list = [None] * len(prompts)
    last_arrival = int(arrivals.max())
    t0 = time.perf_counter()
    with GuardTimer() as guard:
        step = 0
        while step <= last_arrival or engine.has_unfinished:
            for i in by_step.get(step, ()):
                requests[i] = engine.submit(prompts[i], params[i])
            for i in cancel_at.get(step, ()):
                if requests[i] is not None:
                    engine.cancel(requests[i])
            engine.step()
            step += 1
    elapsed = time.perf_counter() - t0
    usage = engine.allocator.usage()
    requests = [s for r in requests for s in r.samples]
    states = [r.state.value for r in requests]
    # Greedy and seeded: a request that finished must have the same tokens under every config.
    outputs = {
        r.request_id: tuple(r.output_token_ids) for r in requests if r.state.value == "finished"
    }
    return outputs, {
        "allocator": allocator,
        "block_size": block_size,
        "num_blocks": num_blocks,
        "guard": "on" if check else "off",
        "requests/s": len(requests) / elapsed,
        "steps": engine.num_steps,
        "ms/step": 1e3 * elapsed / engine.num_steps,
        "guard us/step": 1e6 * guard.seconds / engine.num_steps,
        "preemptions": sum(r.num_preemptions for r in requests),
        "cancelled": states.count("cancelled"),
        "finished": states.count("finished"),
        "failed": states.count("failed"),
        "hit rate": usage.hit_rate,
        "leaked blocks": engine.allocator.num_blocks - usage.num_free_blocks,
        "unfinished": sum(not r.is_finished for r in requests),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=10_000, help="default: 10000")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    args = parser.parse_args()
    model = cl.load_model("tiny-random")
    work = workload(args.num_requests, args.seed)
    import pandas as pd

    rows, reference = [], None
    for allocator, block_size, num_blocks in CONFIGS:
        for check in (True, False):
            outputs, row = run(model, allocator, block_size, num_blocks, work, check)
            reference = reference or outputs
            common = outputs.keys() & reference.keys()
            row["token mismatches"] = sum(outputs[k] != reference[k] for k in common)
            rows.append(row)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    table = pd.DataFrame(rows)
    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    bad = table[
        (table["leaked blocks"] > 0)
        | (table["unfinished"] > 0)
        | (table["failed"] > 0)
        | (table["token mismatches"] > 0)
    ]
    if not bad.empty:
        print("\nLEAK, UNFINISHED REQUEST OR TOKEN MISMATCH:\n" + bad.to_string(index=False))
        return 1
    print("\nno leaked block, every request ended, finished requests' tokens agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
