"""The `cortexlab` command: `info`, `generate`, `compare` (the main job) and `calibrate`."""

from __future__ import annotations

import argparse
import sys
import time


class UsageError(Exception):
    """A bad argument: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _info(args: argparse.Namespace) -> int:
    import cortexlab as cl

    for key, value in cl.info().items():
        print(f"{key:>20}: {value}")
    return 0


def _load_model(name: str | None):
    import cortexlab as cl

    try:
        return cl.load_model(name)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"cortexlab: --model: {exc}") from None


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }


def _generate(args: argparse.Namespace) -> int:
    import cortexlab as cl

    if any(not p.strip() for p in args.prompts):
        raise UsageError("cortexlab generate: a PROMPT is empty")
    cl.seed(args.seed)
    if args.order not in cl.sampling.PRESETS:
        presets = ", ".join(cl.sampling.PRESETS)
        raise UsageError(
            f"cortexlab generate: --order must be one of {presets}, got {args.order!r}"
        )
    try:
        params = cl.SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            n=args.n,
        )
    except ValueError as exc:
        raise UsageError(f"cortexlab generate: {exc}") from None
    model = _load_model(args.model)
    try:
        engine = cl.Engine(
            model,
            scheduler=args.scheduler,
            allocator=args.allocator,
            sampling_order=args.order,
            **_engine_kwargs(args),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cortexlab generate: {exc}") from None
    total_tokens, t0 = 0, time.perf_counter()
    for prompt in args.prompts:
        if len(args.prompts) > 1:
            print(f"\n>>> {prompt}", flush=True)
        before = engine.num_steps
        request = engine.submit(prompt, params, chat=args.chat)
        if request.forks:
            print(f"--- sample {request.request_id} (seed {request.seed})", flush=True)
        for delta in engine.stream(request):
            print(delta, end="", flush=True)
        print(flush=True)
        for fork in request.forks:  # --n: the other samples, which ran alongside
            engine.run_until_done()
            print(f"--- sample {fork.request_id} (seed {fork.seed})\n{fork.text}", flush=True)
        if any(s.error for s in request.samples):
            error = next(s.error for s in request.samples if s.error)
            print(f"cortexlab generate: request failed: {error}", file=sys.stderr)
            return 1
        total_tokens += sum(s.num_output_tokens for s in request.samples)
        print(
            f"[{request.num_prompt_tokens} prompt tokens, {request.num_output_tokens} generated, "
            f"{engine.num_steps - before} steps, finish: {request.finish_reason.value}]",
            file=sys.stderr,
        )
    elapsed = time.perf_counter() - t0
    print(f"[{total_tokens} tokens in {elapsed:.2f} s]", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from cortexlab.study import CompareOptions, run_compare

    try:
        options = CompareOptions.from_args(args)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cortexlab compare: {exc}") from None
    model = _load_model(args.model)
    return run_compare(model, options)


def _calibrate(args: argparse.Namespace) -> int:
    import cortexlab as cl

    model = _load_model(args.model)
    output = args.output or cl.sim.shipped_path(model.name)
    if output is None:
        raise UsageError(
            f"cortexlab calibrate: no calibration ships for {model.name!r}; pass --output FILE"
        )
    grid = cl.sim.DEFAULT_GRID if args.grid else None
    print(f"calibrating {model.name} on this machine (a few minutes)...", file=sys.stderr)
    t0 = time.perf_counter()
    cost_model = cl.sim.calibrate(model, grid=grid)
    path = cost_model.save(output)
    for name, value in cost_model.coefficients.items():
        print(f"{name:>18}: {value:.4g} s")
    info = cost_model.info
    print(
        f"[{info['num_points']} points, step error mean {info['mean_rel_error']:.1%}, max "
        f"{info['max_rel_error']:.1%}; {time.perf_counter() - t0:.0f} s] wrote {path}",
        file=sys.stderr,
    )
    return 0


def _add_engine_flags(parser: argparse.ArgumentParser, *, max_num_seqs: int) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="a .gguf file, a local mlx-lm model folder, or 'tiny-random' "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV block size (default: 16)")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=max_num_seqs,
        help=f"most requests running at once (default: {max_num_seqs})",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step (default: 2048)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the `cortexlab` command."""
    from cortexlab import __version__

    parser = _Parser(prog="cortexlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cortexlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, device, BLAS in effect, measured matmul GFLOP/s")

    gen = sub.add_parser("generate", help="stream completions for one or more prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompt(s)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0.0)")
    gen.add_argument("--top-k", type=int, default=0, help="0 disables (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: 1.0)")
    gen.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="keep tokens with p >= min_p * p_max; 0 disables (default: 0.0)",
    )
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="penalise tokens already in the prompt or output (positive logits / p, "
        "negative * p); 1 disables (default: 1.0)",
    )
    gen.add_argument(
        "--order",
        default="hf",
        help="sampling stage order: hf, llama.cpp or mlx-lm (default: hf; see docs/sampling.md)",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap each prompt in the model's chat template (default: on)",
    )
    gen.add_argument("--scheduler", default="fcfs", help="scheduler name (default: fcfs)")
    gen.add_argument(
        "--allocator",
        default="paged",
        help="KV allocator: paged, contiguous, buddy or prefix (default: paged)",
    )
    gen.add_argument(
        "--n", type=int, default=1, help="parallel samples per prompt, seeds seed+i (default: 1)"
    )
    _add_engine_flags(gen, max_num_seqs=32)

    from cortexlab.study import add_compare_flags

    cmp = sub.add_parser(
        "compare",
        help="compare schedulers on a workload; write results/<name>/ (the main job)",
        description="Run one workload through each scheduler on the real model (measured "
        "clock: idle gaps are skipped) and at several loads; write summary.csv, traces, "
        "figures and report.html under OUT/NAME.",
    )
    add_compare_flags(cmp)
    # Four seats: at the default rate a queue forms, so the order a policy picks matters.
    _add_engine_flags(cmp, max_num_seqs=4)

    cal = sub.add_parser(
        "calibrate",
        help="fit the simulator's cost model to this machine (cl.sim.calibrate)",
        description="Run the calibration workloads through the real engine and fit the "
        "simulator's cost model to every step's measured duration. For the embedded model "
        "the file shipped with cortexlab (cost_model='default') is rewritten unless "
        "--output is given.",
    )
    cal.add_argument(
        "--model",
        default=None,
        help="a .gguf file, a local mlx-lm model folder, or 'tiny-random' "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    cal.add_argument(
        "--output", default=None, help="JSON file to write (default: the shipped calibration)"
    )
    cal.add_argument(
        "--grid",
        action="store_true",
        help="time the forward pass alone on a grid of batch shapes (quicker, leaves out "
        "the engine's scheduling and sampling; default: off)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cortexlab` command."""
    try:
        args = build_parser().parse_args(argv)
        commands = {
            "info": _info,
            "generate": _generate,
            "compare": _compare,
            "calibrate": _calibrate,
        }
        return commands[args.command](args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
