"""MLX `quantized_matmul` on CPU against the fp32 GEMM of the same shapes (issue 12, item 4).

SmolLM2-135M's projections, weights `[out, in]`: q/o 576x576, k/v 192x576, gate/up
1536x576, down 576x1536 (30 layers each, so 30 distinct weights per shape: the weight
traffic of a real step, not one weight hot in cache) and the vocabulary head 49152x576.
At M = 1, 4, 16, 32 rows, fp32 `x @ W.T` (OpenBLAS through MLX) vs `mx.quantized_matmul`
with 8-bit and 4-bit weights, group size 64; times are per step (all 30 copies, or the one
head), best of N with the three variants interleaved. The error column is the relative RMS
error of the quantized product against fp32.

    python benchmarks/quantized.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import cortexlab as cl  # noqa: F401, I001  (before mlx: loads the fast BLAS)

import mlx.core as mx

GROUP = 64
SHAPES = {  # name: (out, in, copies per step)
    "q/o 576x576": (576, 576, 60),
    "k/v 192x576": (192, 576, 60),
    "gate/up 1536x576": (1536, 576, 60),
    "down 576x1536": (576, 1536, 30),
    "head 49152x576": (49152, 576, 1),
}
ROWS = (1, 4, 16, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    t0 = time.perf_counter()
    print(f"BLAS: {cl.info(measure=False)['blas']}")
    print(
        f"\n{'shape':<18}{'M':>4}{'fp32 ms':>9}{'q8 ms':>8}{'q4 ms':>8}"
        f"{'q8/fp32':>9}{'q4/fp32':>9}{'q8 err':>9}{'q4 err':>9}"
    )
    step = {m: [0.0, 0.0, 0.0] for m in ROWS}
    for name, (out, inp, copies) in SHAPES.items():
        ws = [mx.random.normal((out, inp), key=mx.random.key(i)) * 0.05 for i in range(copies)]
        q8 = [mx.quantize(w, group_size=GROUP, bits=8) for w in ws]
        q4 = [mx.quantize(w, group_size=GROUP, bits=4) for w in ws]
        mx.eval(ws, q8, q4)
        for m in ROWS:
            x = mx.random.normal((m, inp), key=mx.random.key(1000 + m))
            mx.eval(x)

            def fp32(x=x, ws=ws):
                return [x @ w.T for w in ws]

            def quant(qs, bits, x=x):
                return [
                    mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=GROUP, bits=bits)
                    for wq, s, b in qs
                ]

            fns = (fp32, lambda q8=q8: quant(q8, 8), lambda q4=q4: quant(q4, 4))
            for fn in fns:
                mx.eval(fn())
            best = [float("inf")] * 3
            for _ in range(repeats):
                for i, fn in enumerate(fns):
                    t = time.perf_counter()
                    mx.eval(fn())
                    best[i] = min(best[i], time.perf_counter() - t)
            ref = x @ ws[0].T
            errs = []
            for qs, bits in ((q8, 8), (q4, 4)):
                wq, s, b = qs[0]
                y = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=GROUP, bits=bits)
                errs.append((mx.sqrt(mx.mean((y - ref) ** 2) / mx.mean(ref**2))).item())
            for i in range(3):
                step[m][i] += best[i]
            f, a, b = (v * 1e3 for v in best)
            print(
                f"{name:<18}{m:>4}{f:>9.2f}{a:>8.2f}{b:>8.2f}"
                f"{a / f:>9.2f}{b / f:>9.2f}{errs[0]:>9.1e}{errs[1]:>9.1e}"
            )
    print("\nAll weights of one step (7 GEMMs x 30 layers + head):")
    print(f"{'M':>4}{'fp32 ms':>9}{'q8 ms':>8}{'q4 ms':>8}{'q8/fp32':>9}{'q4/fp32':>9}")
    for m, (f, a, b) in step.items():
        print(f"{m:>4}{f * 1e3:>9.1f}{a * 1e3:>8.1f}{b * 1e3:>8.1f}{a / f:>9.2f}{b / f:>9.2f}")
    print(f"[{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
