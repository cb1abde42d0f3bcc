"""The `cortexlab` command: `info` and `generate`."""

from __future__ import annotations

import argparse
import sys
import time


def _info(args: argparse.Namespace) -> int:
    import cortexlab as cl

    for key, value in cl.info().items():
        print(f"{key:>20}: {value}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import cortexlab as cl

    cl.seed(args.seed)
    model = cl.load_model(args.model)
    engine = cl.Engine(model)
    try:
        params = cl.SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        )
    except ValueError as exc:
        print(f"cortexlab generate: {exc}", file=sys.stderr)
        return 2
    total_tokens, t0 = 0, time.perf_counter()
    for i, prompt in enumerate(args.prompts):
        if len(args.prompts) > 1:
            print(f"\n>>> {prompt}", flush=True)
        before = engine.num_steps
        for delta in engine.stream(prompt, params, chat=args.chat):
            print(delta, end="", flush=True)
        request = engine.get_request(i)
        print(flush=True)
        if request.error:
            print(f"cortexlab generate: request failed: {request.error}", file=sys.stderr)
            return 1
        total_tokens += request.num_output_tokens
        print(
            f"[{request.num_prompt_tokens} prompt tokens, {request.num_output_tokens} generated, "
            f"{engine.num_steps - before} steps, finish: {request.finish_reason.value}]",
            file=sys.stderr,
        )
    elapsed = time.perf_counter() - t0
    print(f"[{total_tokens} tokens in {elapsed:.2f} s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the `cortexlab` command."""
    parser = argparse.ArgumentParser(prog="cortexlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, BLAS in effect, measured matmul GFLOP/s")
    gen = sub.add_parser("generate", help="stream completions for one or more prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap each prompt in the model's chat template (default: on)",
    )
    gen.add_argument(
        "--model",
        default=None,
        help="a .gguf file, a local mlx-lm model folder, or 'tiny-random' "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cortexlab` command."""
    args = build_parser().parse_args(argv)
    return {"info": _info, "generate": _generate}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
