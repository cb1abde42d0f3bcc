"""Cost of one `schedule()` call for every registered scheduler, with no model in the loop.

A fake serving loop keeps 256 requests waiting and up to 32 running (`max_num_seqs`) over a
real paged allocator large enough for all of them; between timed calls it plays the
engine's part (advance computed tokens, append a token, finish requests, top the queue up
with new arrivals), so each policy is timed in its own steady state, preemptions included.

    python benchmarks/schedulers.py [--steps N] [--warmup N] [--seed S]

Prints the median, p90 and max microseconds per call (plus the mean sequences per batch
and the preemptions, to show what each policy was doing) and flags any policy whose median
reaches 1 ms, exiting with status 1 (the budget: scheduling must stay far below a forward
pass). Run it from the repository root so `cortexlab` resolves to this checkout.
"""

# cortexlab must be imported before mlx-dependent modules; it also loads the fast BLAS.
import cortexlab as cl  # noqa: I001

import argparse
import os
import random
import statistics
import sys
import time
from collections import deque

from cortexlab.kv import PagedAllocator
from cortexlab.request import FinishReason, Request, RequestState
from cortexlab.schedulers import SchedulerConfig, SchedulerState, schedulers

NUM_WAITING = 256
MAX_NUM_SEQS = 32
MAX_NUM_BATCHED_TOKENS = 2048
BLOCK_SIZE = 16
NUM_TENANTS = 8
BUDGET_US = 1000.0


class FakeServing:
    """Requests, allocator and the engine's bookkeeping, without a model."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.num_requests = 0
        # Enough blocks for every queued request at its largest, so memory never runs out
        # unless a policy's own choices make it.
        self.state = SchedulerState(
            waiting=deque(),
            running=[],
            allocator=PagedAllocator(num_blocks=20_000, block_size=BLOCK_SIZE),
            config=SchedulerConfig(
                max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS
            ),
        )
        for _ in range(MAX_NUM_SEQS):
            self._start_decoding(self._new_request())
        self.top_up()

    def _new_request(self) -> Request:
        rng = self.rng
        params = cl.SamplingParams(
            max_tokens=rng.randint(16, 256),
            ignore_eos=True,
            priority=rng.randint(0, 3),
            tenant=f"tenant-{rng.randrange(NUM_TENANTS)}",
        )
        prompt = [rng.randrange(32_000) for _ in range(rng.randint(16, 512))]
        self.num_requests += 1
        return Request(self.num_requests, prompt, params, arrival_time=self.state.now)

    def _start_decoding(self, request: Request) -> None:
        """A request already running: prompt computed, some tokens generated."""
        for _ in range(self.rng.randint(1, request.params.max_tokens - 1)):
            request.append_token(1, self.state.now)
        request.num_computed_tokens = request.num_tokens - 1
        self.state.allocator.allocate(request, request.num_tokens)
        request.transition(RequestState.RUNNING, self.state.now)
        self.state.running.append(request)

    def top_up(self) -> None:
        """New arrivals keep the queue at NUM_WAITING."""
        while len(self.state.waiting) < NUM_WAITING:
            self.state.waiting.append(self._new_request())

    def step(self, batch: cl.schedulers.Batch) -> None:
        """The engine's part after a forward pass: advance, sample, finish."""
        state = self.state
        state.now += 0.01
        for s in batch.scheduled:
            r = s.request
            needs_token = s.needs_logits
            r.num_computed_tokens += s.num_new_tokens
            if needs_token:
                r.append_token(1, state.now)
                if r.num_output_tokens >= r.params.max_tokens:
                    state.running.remove(r)
                    state.allocator.free(r)
                    r.finish(FinishReason.LENGTH, state.now)


def time_policy(name: str, *, steps: int, warmup: int, seed: int) -> tuple[list[float], dict]:
    """Microseconds per schedule() call over `steps` steady-state steps, and batch stats."""
    scheduler = schedulers.create(name)
    serving = FakeServing(seed)
    timings, num_seqs, num_preempted = [], 0, 0
    for i in range(warmup + steps):
        serving.top_up()
        start = time.perf_counter_ns()
        batch = scheduler.schedule(serving.state)
        elapsed = time.perf_counter_ns() - start
        if i >= warmup:
            timings.append(elapsed / 1000)
            num_seqs += batch.num_seqs
            num_preempted += len(batch.preempted)
        serving.step(batch)
    return timings, {"seqs": num_seqs / steps, "preempted": num_preempted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed calls per policy")
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"schedule() with {NUM_WAITING} waiting + {MAX_NUM_SEQS} running, "
        f"budget {MAX_NUM_BATCHED_TOKENS} tokens; {args.steps} timed calls each "
        f"(python {sys.version.split()[0]}, load {load:.2f})\n"
    )
    print(f"| {'policy':<10} | median µs | p90 µs | max µs | seqs/step | preempted | |")
    print(f"|{'-' * 12}|----------:|-------:|-------:|----------:|----------:|---|")
    is_over = False
    for name in schedulers.available():
        timings, stats = time_policy(name, steps=args.steps, warmup=args.warmup, seed=args.seed)
        median = statistics.median(timings)
        p90 = statistics.quantiles(timings, n=10)[-1]
        flag = "**>= 1 ms**" if median >= BUDGET_US else ""
        is_over = is_over or bool(flag)
        print(
            f"| {name:<10} | {median:9.0f} | {p90:6.0f} | {max(timings):6.0f} "
            f"| {stats['seqs']:9.1f} | {stats['preempted']:9d} | {flag} |"
        )
    return 1 if is_over else 0


if __name__ == "__main__":
    sys.exit(main())
