"""Wall time of a large simulated run: 10,000 requests through the real schedulers and
allocators with ``clock="simulated"`` (no forward pass; a cost model prices each step).

    python benchmarks/sim_scale.py [--requests N] [--rate R] [--scheduler S]
        [--allocator A] [--max-num-seqs N] [--cost-model PATH]
        [--trace full|summary|none] [--stream]

    # 100,000 requests in flat memory: a SummaryTrace and streaming submission
    python benchmarks/sim_scale.py --requests 100000 --trace summary --stream

A Poisson workload on `tiny-random` (its tokenizer makes the prompts), at a rate near the
simulated engine's capacity so the queue never empties, through one engine, recorded by a
Trace. The cost model is hand-written (roughly SmolLM2-135M on two CPU cores) unless
`--cost-model` names a saved calibration. Prints the wall time, steps, simulated seconds,
the step rate, the process's peak memory, and the run's summary; exits 1 when 10,000
requests take a minute or more (the issue's budget). Run it from the repository root.

`--trace summary` records a `cl.SummaryTrace` (streaming aggregates, no per-request or
per-step rows) instead of a full `cl.Trace`; `--stream` hands requests to the engine as
the clock reaches them (`Engine.feed`, prompts made one at a time by
`Workload.iter_materialize`) instead of materializing and submitting them all first. At
10%, 50% and 100% of the requests finished it prints the wall time, the process's current
RSS and its peak so far: with both, memory stays flat.
"""

# cortexlab must be imported before mlx-dependent modules; it also loads the fast BLAS.
import cortexlab as cl  # noqa: I001

import argparse
import os
import resource
import sys
import time

BUDGET_S = 60.0
# Roughly SmolLM2-135M float32 on two CPU cores (seconds per unit).
COST_MODEL = cl.sim.CostModel(
    step_s=2e-3,
    forward_s=3e-3,
    prefill_token_s=2.5e-4,
    decode_row_s=6e-4,
    context_token_s=2e-6,
    padding_token_s=2.5e-4,
    sampled_row_s=1e-4,
)


def _memory() -> tuple[float, float]:
    """(current RSS, peak RSS so far) of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, peak
    except OSError:  # not Linux: the peak is all there is
        return peak, peak


def main() -> int:
    """Run the benchmark; 0 when within budget."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=16.0, help="requests per simulated second")
    parser.add_argument("--scheduler", default="fcfs")
    parser.add_argument("--allocator", default="paged")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--cost-model", default=None, help="a CostModel JSON file")
    parser.add_argument("--trace", choices=("full", "summary", "none"), default="full")
    parser.add_argument("--stream", action="store_true", help="submit requests as they arrive")
    args = parser.parse_args()

    model = cl.load_model("tiny-random")
    cost_model = cl.sim.CostModel.load(args.cost_model) if args.cost_model else COST_MODEL
    workload = cl.workloads.poisson(args.rate, num_requests=args.requests, seed=0)
    t0 = time.perf_counter()
    requests = workload.iter_materialize(model) if args.stream else workload.materialize(model)
    t_materialize = time.perf_counter() - t0
    engine = cl.Engine(
        model,
        scheduler=args.scheduler,
        allocator=args.allocator,
        max_num_seqs=args.max_num_seqs,
        num_blocks=args.num_blocks,
        clock="simulated",
        cost_model=cost_model,
    )
    trace = {"full": cl.Trace, "summary": cl.SummaryTrace, "none": lambda: None}[args.trace]()
    checkpoints = sorted({max(1, args.requests * p // 100) for p in (10, 50, 100)})
    samples = []
    t0 = time.perf_counter()

    num_ended = 0

    def on_finished(event) -> None:  # a wall-time and memory sample at each checkpoint
        nonlocal num_ended
        num_ended += 1
        if checkpoints and num_ended == checkpoints[0]:
            checkpoints.pop(0)
            samples.append((num_ended, time.perf_counter() - t0, *_memory()))

    hooks = dict(trace.hooks) if trace is not None else {}
    with engine.hooks(hooks), engine.hooks({"request.finished": on_finished}):
        if args.stream:
            engine.feed(
                (r.arrival_time, r.prompt_token_ids, r.params, index)
                for index, r in enumerate(requests)
            )
        else:
            for index, r in enumerate(requests):
                engine.submit(
                    r.prompt_token_ids, r.params, request_id=index, arrival_time=r.arrival_time
                )
        engine.run_until_done()
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.requests} requests, {args.scheduler}/{args.allocator}, "
        f"max_num_seqs={args.max_num_seqs}, trace={args.trace}, stream={args.stream}"
    )
    made = "setup only; prompts made in the run" if args.stream else "not counted"
    print(f"materialize: {t_materialize:.1f} s ({made})")
    for finished, seconds, rss, peak in samples:
        print(
            f"  {finished:>7} finished: {seconds:6.1f} s wall, RSS {rss:5.0f} MiB "
            f"(peak so far {peak:5.0f} MiB)"
        )
    print(
        f"wall: {wall:.1f} s for {engine.num_steps} steps ({engine.num_steps / wall:.0f} steps/s), "
        f"{engine.clock.now():.1f} simulated s; peak RSS {peak_mib:.0f} MiB"
    )
    if trace is not None:
        summary = trace.summary()
        shown = ("num_finished", "num_failed", "ttft_p50", "ttft_p99", "tpot_p50", "e2e_p99")
        print({k: round(float(summary[k]), 4) for k in shown if k in summary})
    if args.requests >= 10_000 and wall * 10_000 / args.requests >= BUDGET_S:
        print(f"over budget: 10,000 requests must take < {BUDGET_S:.0f} s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
