"""Where a prefill and a decode step spend their time: cortexlab's engine path vs bare mlx-lm.

Issue 12, item 1. On the embedded model (SmolLM2-135M, float32):

* totals: a prefill of one 64/400/1,500-token prompt and a batch-16 decode step at a context
  of 64/400/1,500 tokens, through cortexlab's runner over the KV arena (`Runner.forward`,
  head on the sampled positions only) and through the bare mlx-lm module with its own caches
  (`KVCache` for the prompt, `BatchKVCache` of the same 16 rows for decode, logits of every
  position as `Model.__call__` computes them), interleaved, best of N;
* a breakdown by op class, each timed as isolated ops with the model's real shapes and
  weights, all layers in one evaluated graph (MLX has no per-op profiler on CPU): weight
  GEMMs (7 per layer, the 30 layers' own weights), vocabulary head, attention (mlx-lm: the
  SDPA call with its causal string or boolean mask; engine: the runner's arena attention of
  models/fast_attention.py with its K/V writes, or SDPA under the plan's mask chunked like
  the runner when the fast path is off), K/V cache traffic (engine: the host-side plan, plus
  arena scatter + block gather on the exact path; mlx-lm: its cache update and mask), SiLU·up, RMSNorm, RoPE, and sampling (greedy argmax + log-softmax of the sampled
  rows). "other" is the total minus the parts: dispatch, embedding, residual adds, reshapes.

    python benchmarks/profile_step.py            # ~3 minutes on 2 loaded cores
    python benchmarks/profile_step.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import time

import cortexlab as cl  # noqa: I001  (before mlx: loads the fast BLAS)
from cortexlab.kv.arena import KVArena, PagedLayerCache, plan_forward
from cortexlab.models.fast import fast_swiglu
from cortexlab.models.fast_attention import paged_attention
from cortexlab.runner import RowWork, Runner

import mlx.core as mx
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

BLOCK = 16
DECODE_BATCH = 16


def best(fn, repeats: int) -> float:
    """Best wall time of `fn()` (which evaluates its own work), seconds; one warm-up call
    unless only one timed call is asked for (the long prompts: seconds each)."""
    if repeats > 1:
        fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function, calls alternating so that load drifts hit all alike."""
    for fn in fns.values():
        if repeats > 1:
            fn()
    out = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k] = min(out[k], time.perf_counter() - t0)
    return out


class Shapes:
    def __init__(self, model: cl.Model) -> None:
        m = model.module
        attn = m.layers[0].self_attn
        self.layers = m.layers
        self.n = len(m.layers)
        self.heads = attn.n_heads
        self.kv_heads = attn.n_kv_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.rope = attn.rope
        self.hidden = m.args.hidden_size
        self.embed = m.model.embed_tokens
        self.lm_head = getattr(m, "lm_head", None)
        self.intermediate = m.layers[0].mlp.gate_proj.weight.shape[0]

    def head(self, h: mx.array) -> mx.array:
        return self.lm_head(h) if self.lm_head is not None else self.embed.as_linear(h)


def rand(shape, seed: int = 0) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)) * 0.5


# --- op classes, timed in isolation -----------------------------------------------------------


def gemms(s: Shapes, tokens: int):
    x = rand((tokens, s.hidden), 1)
    h = rand((tokens, s.intermediate), 2)
    a = rand((tokens, s.heads * s.head_dim), 3)
    mx.eval(x, h, a)

    def run():
        outs = []
        for layer in s.layers:
            at, mlp = layer.self_attn, layer.mlp
            outs += [at.q_proj(x), at.k_proj(x), at.v_proj(x), at.o_proj(a)]
            outs += [mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj(h)]
        mx.eval(outs)

    return run


def head(s: Shapes, rows: int):
    x = rand((rows, s.hidden), 4)
    mx.eval(x)
    return lambda: mx.eval(s.head(x))


def silu(s: Shapes, tokens: int, fast: bool = False):
    """mlx-lm's swiglu, or (fast) the runner's 2**x form (`Runner.fast_activation`)."""
    g, u = rand((s.n, tokens, s.intermediate), 5), rand((s.n, tokens, s.intermediate), 6)
    mx.eval(g, u)
    fn = fast_swiglu if fast else swiglu
    return lambda: mx.eval([fn(g[i], u[i]) for i in range(s.n)])


def rmsnorm(s: Shapes, tokens: int):
    x = rand((2 * s.n + 1, tokens, s.hidden), 7)
    w = mx.ones((s.hidden,))
    mx.eval(x, w)
    return lambda: mx.eval([mx.fast.rms_norm(x[i], w, 1e-5) for i in range(2 * s.n + 1)])


def rope(s: Shapes, batch: int, length: int, offset):
    q = rand((s.n, batch, s.heads, length, s.head_dim), 8)
    k = rand((s.n, batch, s.kv_heads, length, s.head_dim), 9)
    mx.eval(q, k)

    def run():
        mx.eval([(s.rope(q[i], offset=offset), s.rope(k[i], offset=offset)) for i in range(s.n)])

    return run


def attention(s: Shapes, batch: int, queries: list[tuple[int, int]], masks: list):
    """SDPA over `queries` pieces [(L, K)] per layer with the given masks (one per piece)."""
    qs, ks = [], []
    for j, (length, width) in enumerate(queries):
        qs.append(rand((batch, s.heads, length, s.head_dim), 10 + j))
        ks.append(rand((batch, s.kv_heads, width, s.head_dim), 40 + j))
    mx.eval(qs, ks)

    def run():
        outs = []
        for _ in range(s.n):
            for q, k, m in zip(qs, ks, masks, strict=True):
                outs.append(mx.fast.scaled_dot_product_attention(q, k, k, scale=s.scale, mask=m))
        mx.eval(outs)

    return run


def arena_attention(s: Shapes, arena, tables, offsets: list[int], lengths: list[int]):
    """The runner's fast attention (models/fast_attention.py) over a real plan, per layer,
    K/V writes included: query blocks with a 2**x softmax for prompts, gather_mm over the
    arena blocks for decode."""
    batch, length = len(lengths), max(lengths)
    q = rand((batch, s.heads, length, s.head_dim), 15)
    k = rand((batch, s.kv_heads, length, s.head_dim), 16)
    mx.eval(q, k)

    def run():
        plan = plan_forward(arena, tables, offsets, lengths, attention_reads_plan=True)
        outs = []
        for layer in range(s.n):
            cache = PagedLayerCache(arena, layer, plan)
            outs.append(paged_attention(q, k, k, cache, s.scale))
        mx.eval(outs, arena.keys, arena.values)

    return run


def sampling(s: Shapes, rows: int):
    logits = rand((rows, s.embed.weight.shape[0]), 11)
    mx.eval(logits)

    def run():
        tok = mx.argmax(logits, axis=-1)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(tok, mx.take_along_axis(lp, tok[:, None], axis=-1))

    return run


# --- engine and mlx-lm setups -------------------------------------------------------------------


def make_arena(model: cl.Model, rows: int, context: int) -> tuple[KVArena, list[list[int]]]:
    per_row = -(-(context + 8) // BLOCK)
    arena = KVArena(
        num_layers=model.num_layers,
        num_blocks=rows * per_row + 1,
        block_size=BLOCK,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        initial_blocks=rows * per_row + 1,
    )
    # Random K/V in the used blocks (content only matters for realism, not for timing).
    arena.keys = [rand(k.shape, 100 + i) for i, k in enumerate(arena.keys)]
    arena.values = [rand(v.shape, 200 + i) for i, v in enumerate(arena.values)]
    mx.eval(arena.keys, arena.values)
    tables = [list(range(r * per_row, (r + 1) * per_row)) for r in range(rows)]
    return arena, tables


def engine_kv_traffic(model: cl.Model, s: Shapes, arena, tables, offsets, lengths):
    """Arena scatter + gather per layer, and the host-side plan (rows, mask) of the forward."""
    plan = plan_forward(arena, tables, offsets, lengths)
    g, length, h, d = len(lengths), max(lengths), arena.num_kv_heads, arena.head_dim
    new = rand((g * length * h, d), 12)
    mx.eval(new)

    def run():
        p = plan_forward(arena, tables, offsets, lengths)
        outs = [p.mask, p.write_rows]
        for layer in range(s.n):
            arena.keys[layer][plan.write_rows] = new
            arena.values[layer][plan.write_rows] = new
            if plan.read_rows is not None:
                outs += list(arena.gather(layer, plan.read_rows))
        mx.eval(outs, arena.keys, arena.values)

    return run


def mlxlm_decode_caches(model: cl.Model, s: Shapes, context: int) -> list:
    caches = []
    for i in range(s.n):
        c = BatchKVCache(left_padding=[0] * DECODE_BATCH)
        shape = (DECODE_BATCH, s.kv_heads, context, s.head_dim)
        c.update_and_fetch(rand(shape, 300 + i), rand(shape, 400 + i))
        caches.append(c)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches


def trim(caches, n: int) -> None:
    for c in caches:
        c.trim(n)


def prefill_case(model, s, prompt: int, repeats: int) -> dict:
    vocab = s.embed.weight.shape[0]
    tokens = np.random.default_rng(prompt).integers(0, vocab, prompt).tolist()
    arena, tables = make_arena(model, 1, prompt)
    runner = Runner(model, arena)
    rows = [RowWork(tables[0], 0, tokens, True)]
    x = mx.array([tokens])

    def engine():
        mx.eval(runner.forward(rows), arena.keys, arena.values)

    def bare():
        cache = make_prompt_cache(model.module)
        mx.eval(model.module(x, cache=cache)[:, -1], [(c.keys, c.values) for c in cache])

    totals = interleaved({"engine": engine, "mlx-lm": bare}, repeats)
    # Engine pieces: the runner's waves (one for any prompt up to its chunk), then either
    # its arena attention (K/V writes inside it) or SDPA under an explicit boolean mask.
    chunk = runner.attention_chunk
    starts = list(range(0, prompt, chunk))
    pieces = [(min(prompt, a + chunk) - a, min(prompt, a + chunk)) for a in starts]
    widths = [-(-w // BLOCK) * BLOCK if a else w for a, (_, w) in zip(starts, pieces, strict=True)]
    pieces = [(n, w) for (n, _), w in zip(pieces, widths, strict=True)]
    emasks = [
        mx.array((np.arange(w)[None, :] <= (a + np.arange(n))[:, None])[None, None])
        for a, (n, w) in zip(starts, pieces, strict=True)
    ]
    if runner.fast_attention:
        engine_attention = sum(
            best(arena_attention(s, arena, tables, [a], [n]), repeats)
            for a, (n, _) in zip(starts, pieces, strict=True)
        )
        kv_engine = best(lambda: plan_forward(arena, tables, [0], [prompt]), repeats)
    else:
        engine_attention = best(attention(s, 1, pieces, emasks), repeats)
        kv_engine = sum(
            best(engine_kv_traffic(model, s, arena, tables, [a], [n]), repeats)
            for a, (n, _) in zip(starts, pieces, strict=True)
        )
    parts = {
        "engine": {
            "weight GEMMs": best(gemms(s, prompt), repeats),
            "vocab head": best(head(s, 1), repeats),
            "attention": engine_attention,
            "K/V gather + mask": kv_engine,
            "SiLU·up": best(silu(s, prompt, runner.fast_activation), repeats),
            "RMSNorm": best(rmsnorm(s, prompt), repeats),
            "RoPE": sum(
                best(rope(s, 1, n, mx.array([a], dtype=mx.int32)), repeats)
                for a, (n, _) in zip(starts, pieces, strict=True)
            ),
            "sampling": best(sampling(s, 1), repeats),
        },
        "mlx-lm": {
            "weight GEMMs": None,
            "vocab head": best(head(s, prompt), repeats),
            "attention": best(attention(s, 1, [(prompt, prompt)], ["causal"]), repeats),
            "K/V gather + mask": best(kvcache_update(s, prompt), repeats),
            "SiLU·up": best(silu(s, prompt), repeats),
            "RMSNorm": None,
            "RoPE": best(rope(s, 1, prompt, 0), repeats),
            "sampling": None,
        },
    }
    for k, v in parts["mlx-lm"].items():
        if v is None:
            parts["mlx-lm"][k] = parts["engine"][k]  # same op, same shapes
    return {"totals": totals, "parts": parts}


def kvcache_update(s: Shapes, length: int):
    """mlx-lm's KVCache writes of one prefill (all layers)."""
    shape = (1, s.kv_heads, length, s.head_dim)
    k = rand(shape, 13)
    mx.eval(k)

    def run():
        outs = []
        for _ in range(s.n):
            c = KVCache()
            outs += list(c.update_and_fetch(k, k))
        mx.eval(outs)

    return run


def decode_case(model, s, context: int, repeats: int) -> dict:
    vocab = s.embed.weight.shape[0]
    arena, tables = make_arena(model, DECODE_BATCH, context)
    runner = Runner(model, arena)
    toks = np.random.default_rng(context).integers(0, vocab, DECODE_BATCH).tolist()
    rows = [RowWork(t, context, [tok], True) for t, tok in zip(tables, toks, strict=True)]
    caches = mlxlm_decode_caches(model, s, context)
    x = mx.array([[t] for t in toks])

    def engine():
        mx.eval(runner.forward(rows), arena.keys, arena.values)

    def bare():
        mx.eval(model.module(x, cache=caches)[:, -1], [(c.keys, c.values) for c in caches])
        trim(caches, 1)  # keep the context length fixed across repeats

    totals = interleaved({"engine": engine, "mlx-lm": bare}, repeats)
    width = -(-(context + 1) // BLOCK) * BLOCK
    emask = mx.array(
        np.broadcast_to(np.arange(width) <= context, (DECODE_BATCH, 1, 1, width)).copy()
    )
    bmask = mx.array(np.ones((DECODE_BATCH, 1, 1, context + 1), dtype=bool))
    offsets = [context] * DECODE_BATCH
    parts = {
        "engine": {
            "weight GEMMs": best(gemms(s, DECODE_BATCH), repeats),
            "vocab head": best(head(s, DECODE_BATCH), repeats),
            "attention": best(
                arena_attention(s, arena, tables, offsets, [1] * DECODE_BATCH)
                if runner.fast_attention
                else attention(s, DECODE_BATCH, [(1, width)], [emask]),
                repeats,
            ),
            "K/V gather + mask": best(
                (lambda: plan_forward(arena, tables, offsets, [1] * DECODE_BATCH))
                if runner.fast_attention
                else engine_kv_traffic(model, s, arena, tables, offsets, [1] * DECODE_BATCH),
                repeats,
            ),
            "SiLU·up": best(silu(s, DECODE_BATCH, runner.fast_activation), repeats),
            "RMSNorm": best(rmsnorm(s, DECODE_BATCH), repeats),
            "RoPE": best(rope(s, DECODE_BATCH, 1, mx.array(offsets, dtype=mx.int32)), repeats),
            "sampling": best(sampling(s, DECODE_BATCH), repeats),
        },
    }
    mlx = dict(parts["engine"])
    mlx["attention"] = best(attention(s, DECODE_BATCH, [(1, context + 1)], [bmask]), repeats)
    mlx["K/V gather + mask"] = best(batchcache_update(s, context), repeats)
    mlx["SiLU·up"] = best(silu(s, DECODE_BATCH), repeats)
    mlx["RoPE"] = best(rope(s, DECODE_BATCH, 1, mx.array(offsets, dtype=mx.int32)), repeats)
    parts["mlx-lm"] = mlx
    return {"totals": totals, "parts": parts}


def batchcache_update(s: Shapes, context: int):
    """mlx-lm's BatchKVCache write of one decode token plus its mask (all layers)."""
    caches = mlxlm_decode_caches_small(s, context)
    k = rand((DECODE_BATCH, s.kv_heads, 1, s.head_dim), 14)
    mx.eval(k)

    def run():
        outs = []
        for c in caches:
            outs += list(c.update_and_fetch(k, k))
            outs.append(c.make_mask(1, return_array=True))
        mx.eval(outs)
        trim(caches, 1)

    return run


def mlxlm_decode_caches_small(s: Shapes, context: int) -> list:
    caches = []
    shape = (DECODE_BATCH, s.kv_heads, context, s.head_dim)
    k = rand(shape, 15)
    for _ in range(s.n):
        c = BatchKVCache(left_padding=[0] * DECODE_BATCH)
        c.update_and_fetch(k, k)
        caches.append(c)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches


PARTS = (
    "weight GEMMs",
    "vocab head",
    "attention",
    "K/V gather + mask",
    "SiLU·up",
    "RMSNorm",
    "RoPE",
    "sampling",
)


def print_table(title: str, results: dict[int, dict]) -> None:
    sizes = list(results)
    print(f"\n{title} (ms; best of N; engine | mlx-lm)")
    head_cells = "".join(f"{n:>9} eng {n:>6} mlx" for n in sizes)
    print(f"{'':<20}{head_cells}")

    def row(label, get):
        cells = ""
        for n in sizes:
            e, m = get(results[n], "engine"), get(results[n], "mlx-lm")
            cells += f"{e * 1e3:>13.1f}{m * 1e3:>11.1f}"
        print(f"{label:<20}{cells}")

    row("total", lambda r, k: r["totals"][k])
    for p in PARTS:
        row(p, lambda r, k, p=p: r["parts"][k][p])
    row("other", lambda r, k: r["totals"][k] - sum(r["parts"][k].values()))
    ratios = "".join(
        f"{results[n]['totals']['engine'] / results[n]['totals']['mlx-lm']:>13.2f}{'':>11}"
        for n in sizes
    )
    print(f"{'engine / mlx-lm':<20}{ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--prompts", default="64,400,1500")
    ap.add_argument("--contexts", default="64,400,1500")
    args = ap.parse_args()
    repeats = 2 if args.quick else 3
    t0 = time.perf_counter()
    model = cl.load_model()
    s = Shapes(model)
    print(
        f"{model.name}: {s.n} layers, hidden {s.hidden}, {s.heads}/{s.kv_heads} heads x "
        f"{s.head_dim}, intermediate {s.intermediate}, vocab {s.embed.weight.shape[0]}, "
        f"{model.dtype}; BLAS: {cl.info(measure=False)['blas']}"
    )
    # Long prompts cost seconds per call (CPU attention pays a scalar exp per query-key
    # score, causal or not): fewer repeats as prompts grow, one call at 1,500 tokens.
    prefill = {
        n: prefill_case(model, s, n, max(1, min(repeats, round(repeats * 200 / n))))
        for n in map(int, args.prompts.split(","))
    }
    print_table("Prefill of one prompt (tokens)", prefill)
    decode = {c: decode_case(model, s, c, repeats + 2) for c in map(int, args.contexts.split(","))}
    print_table(f"Decode step, batch {DECODE_BATCH} (context tokens)", decode)
    print(
        "\nParts are isolated ops at the model's shapes, all layers in one graph; 'other' is "
        "the total minus the parts (dispatch, embedding, residual adds, reshapes; negative "
        "when isolated ops run slower than inside the model)."
    )
    print(f"[{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
