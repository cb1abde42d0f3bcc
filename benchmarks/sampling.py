"""Sampling cost: batch-16 stage mixes against a measured SmolLM2 batch-16 decode step.

1. Runs 16 chat requests through the engine on the embedded SmolLM2-135M-Instruct and takes
   the median duration of the decode-only steps (greedy), with the forward's logits recorded.
2. Times the sampler alone (``run`` + the eval + ``resolve``: what the engine's step pays)
   on those real logits for several mixes of stages, 16 rows with different parameters,
   penalties over ~200-token histories. Reports median ms and the share of a decode step.
3. Metadata on vs off: the same mix with ``logprobs=5`` and with the ``sampler.distribution``
   record; and the engine's decode step with each of them on.

    python benchmarks/sampling.py [--steps 8] [--repeats 30]

Exits with status 1 if the target mix (penalties + top-p + min-p) costs 10% of a decode
step or more. Timings on a shared CPU are noisy; the load average is printed.
"""

# cortexlab must be imported before mlx: it loads the fast BLAS that MLX then binds to.
import cortexlab as cl  # noqa: I001

import argparse
import dataclasses
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from cortexlab.sampling import SamplerState, SamplingBatch, run

SP = cl.SamplingParams
PROMPTS = [
    "Write a short story about a dragon who learns to cook.",
    "What is the capital of France, and why is it famous?",
    "List some fruits that grow in tropical climates.",
    "Tell me a joke about computers.",
    "Describe the ocean at night.",
    "Explain gravity to a child.",
    "Give me three ideas for a birthday party.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "How do I make a cup of tea?",
    "What are the planets of the solar system?",
    "Summarise the plot of Romeo and Juliet.",
    "Suggest a name for a pet turtle.",
    "What is machine learning?",
    "Describe a busy market in the morning.",
    "Translate 'good evening' into French and Spanish.",
]


def target_mix(i: int) -> SP:
    """Penalties + top-p + min-p, parameters varying row to row."""
    return SP(
        temperature=(0.6, 0.7, 0.8, 1.0)[i % 4],
        top_p=(0.9, 0.95)[i % 2],
        min_p=(0.02, 0.05)[i % 2],
        repetition_penalty=1.1,
        presence_penalty=0.3,
        frequency_penalty=0.3,
        seed=i,
    )


def mix(**kw):
    return lambda i: SP(seed=i, **kw)


MIXES = {
    "greedy": mix(),
    "temperature 0.8": mix(temperature=0.8),
    "top-k 50": mix(temperature=0.8, top_k=50),
    "top-p 0.9": mix(temperature=0.8, top_p=0.9),
    "top-p 0.95 at T=1": mix(temperature=1.0, top_p=0.95),
    "min-p 0.05": mix(temperature=0.8, min_p=0.05),
    "penalties + top-p + min-p": target_mix,
    "  same, llama.cpp order": lambda i: dataclasses.replace(target_mix(i), order="llama.cpp"),
    "typical-p 0.9": mix(temperature=0.8, typical_p=0.9),
    "epsilon 3e-4 + eta 3e-4": mix(temperature=0.8, epsilon_cutoff=3e-4, eta_cutoff=3e-4),
    "top-n-sigma 1.0": mix(temperature=1.0, top_n_sigma=1.0),
    "XTC (p=0.5, t=0.1)": mix(temperature=0.8, xtc_probability=0.5, xtc_threshold=0.1),
    "mirostat v2 (tau 5)": mix(temperature=0.8, mirostat_tau=5.0),
    "DRY (0.8, 1.75, 2)": mix(temperature=0.8, dry_multiplier=0.8, dry_sequence_breakers=[198]),
}


def decode_steps(model, *, steps: int, hooks=None, **extra) -> tuple[float, list[np.ndarray]]:
    """Median decode-only step duration (s) of 16 requests, and the logits of those steps."""
    engine = cl.Engine(model, max_num_seqs=16)
    recorded, forward = [], engine.runner.forward

    def recording(rows):
        out = forward(rows)
        if all(not s.request.is_prefill for s in engine.last_batch.scheduled):
            recorded.append(out)
        return out

    engine.runner.forward = recording
    trace = cl.Trace()
    params = SP(max_tokens=steps + 1, ignore_eos=True, **extra)
    with engine.hooks({**trace.hooks, **(hooks or {})}):
        engine.generate(PROMPTS, params, chat=True)
    durations = trace.steps.query("num_prefill_seqs == 0 and num_generated_tokens == 16").duration
    return statistics.median(durations), [np.array(x) for x in recorded]


def histories(rng) -> list[SamplerState]:
    return [
        SamplerState(rng.integers(0, 49152, 100).tolist(), rng.integers(0, 2000, 100).tolist())
        for _ in range(16)
    ]


def time_mix(make, logits: list[mx.array], states, repeats: int, **options) -> float:
    """Median seconds for run + eval + resolve over `repeats` calls (cycling the logits)."""
    params = tuple(make(i) for i in range(16))
    times = []
    for r in range(repeats + 3):
        x = logits[r % len(logits)]
        batch = SamplingBatch(params, tuple(range(16)), (r,) * 16, states, (2,))
        t0 = time.perf_counter()
        sampled = run(x, batch, **options)
        mx.eval(*sampled.arrays)
        sampled.resolve()
        if r >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="decode steps per engine run")
    ap.add_argument("--repeats", type=int, default=30, help="timed sampler calls per mix")
    args = ap.parse_args()
    model = cl.load_model()
    print(f"{model!r}; load average {os.getloadavg()[0]:.2f}; 16 rows, vocab {model.vocab_size}")

    step, raw = decode_steps(model, steps=args.steps)
    logits = [mx.array(x) for x in raw]
    mx.eval(*logits)
    print(f"decode step (batch 16, greedy): {step * 1e3:.1f} ms (median of {len(raw)} steps)\n")
    states = tuple(histories(np.random.default_rng(0)))
    print(f"{'mix (batch 16)':32s} {'ms':>7s} {'% of step':>10s}")
    results = {}
    for name, make in MIXES.items():
        results[name] = time_mix(make, logits, states, args.repeats)
        print(f"{name:32s} {results[name] * 1e3:7.2f} {results[name] / step * 100:9.1f}%")

    print("\nmetadata on vs off (sampler alone, target mix)")
    off = results["penalties + top-p + min-p"]
    with_logprobs = time_mix(
        lambda i: dataclasses.replace(target_mix(i), logprobs=5), logits, states, args.repeats
    )
    recorded = time_mix(target_mix, logits, states, args.repeats, record=True)
    for name, value in [("off", off), ("logprobs=5", with_logprobs), ("record (hook)", recorded)]:
        print(f"  {name:30s} {value * 1e3:7.2f} ms {value / step * 100:9.1f}%")

    print("\nmetadata on vs off (engine decode step, greedy)")
    logprob_step, _ = decode_steps(model, steps=args.steps, logprobs=5)
    hook_step, _ = decode_steps(
        model, steps=args.steps, hooks={"sampler.distribution": lambda event: None}
    )
    again, _ = decode_steps(model, steps=args.steps)
    for name, value in [
        ("off", step),
        ("logprobs=5", logprob_step),
        ("sampler.distribution hook", hook_step),
        ("off (again)", again),
    ]:
        print(f"  {name:30s} {value * 1e3:7.1f} ms")

    share = off / step
    print(f"\ntarget mix: {share * 100:.1f}% of a decode step (limit 10%)")
    return 0 if share < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
