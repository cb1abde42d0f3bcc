"""Causal attention over the KV arena with a base-2 softmax, for llama-family models.

On CPU, MLX's ``scaled_dot_product_attention`` is composed of ops: it scores every query
against every key it is given (the whole causal square for a prompt) and exponentiates each
score with the scalar ``exp`` (~17 ns each, most of a long prompt's time). Here attention
reads the runner's `ForwardPlan` instead of a mask:

* queries go in blocks of `QUERY_BLOCK`; each block scores only the keys some of its
  queries can see, so a prompt computes about half the causal square, in one model forward;
* the softmax is ``2 ** (s - max)`` on scores pre-scaled by ``log2 e`` (``mx.power`` with
  base 2 is vectorised, ~3x faster than ``exp``), normalised after the value matmul;
* grouped-query heads are folded into the query rows, so K/V are never repeated;
* a block whose every query sees every key it is given (a decode batch of equal contexts)
  gets no mask at all, otherwise an additive 0/-inf bias built on the host.

It differs from mlx-lm by float rounding only (log-probabilities within ~1e-5 on SmolLM2).
As in `fast.py`, nothing in mlx-lm is changed: each attention *instance* gets a subclass whose
``__call__`` takes this path only while the runner's forward builds its graph with a
`PagedLayerCache`, and runs mlx-lm's own code otherwise.
"""

from __future__ import annotations

import inspect
import math

from cortexlab.kv.arena import ForwardPlan, PagedLayerCache
from cortexlab.models.fast import SwitchedSubclasses

import mlx.core as mx
import numpy as np
from mlx_lm.models import llama

# Query rows per attention block. Smaller blocks skip more of the causal square's masked half
# but make more, smaller matmuls; 64 measured best at 400 and 1,500 tokens (SmolLM2, 2 cores).
QUERY_BLOCK = 64
_LOG2E = math.log2(math.e)

_ARENA = SwitchedSubclasses("cortexlab_fast_attention")


def _code_lines(fn) -> list[str]:
    lines = (line.split("#")[0].strip() for line in inspect.getsource(fn).splitlines())
    return [line for line in lines if line]


# Attention classes whose __call__ is line for line llama's (qwen2's is; mistral loads as
# llama): projections, RoPE at `cache.offset`, `update_and_fetch`, SDPA, output projection.
_LLAMA_CALL = _code_lines(llama.Attention.__call__)


def softmax2_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, bias: mx.array | None
) -> mx.array:
    """``softmax(q k^T * scale + bias) v`` for q `[B, H, L, D]` and k, v `[B, Hkv, K, D]`
    (H a multiple of Hkv); `bias` broadcasts to `[B, Hkv, H / Hkv, L, K]`."""
    b, h, length, d = queries.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    rep = h // kv_heads
    # Query head j uses K/V head j // rep: fold the rep heads into the matmul's rows.
    q = (queries * (scale * _LOG2E)).reshape(b, kv_heads, rep * length, d)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(b, kv_heads, rep, length, num_keys)
    if scores.dtype != mx.float32:
        scores = scores.astype(mx.float32)
    if bias is not None:
        scores = scores + bias
    weights = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights.astype(values.dtype).reshape(b, kv_heads, rep * length, num_keys)
    out = (weights @ values).reshape(b, kv_heads, rep, length, d) / total.astype(values.dtype)
    return out.reshape(b, h, length, d)


def paged_attention(
    queries: mx.array, keys: mx.array, values: mx.array, cache: PagedLayerCache, scale: float
) -> mx.array:
    """Write the new K/V to the arena and attend over each row's context, block by block."""
    plan = cache.plan
    if queries.shape[2] == 1 and plan.read_rows is not None:
        cache.write(keys, values)
        return _decode_by_blocks(queries, cache, scale)
    keys, values = cache.update_and_fetch(keys, values)
    length = queries.shape[2]
    outs = []
    for start in range(0, length, QUERY_BLOCK):
        stop = min(length, start + QUERY_BLOCK)
        num_keys, bias = _query_block(plan, start, stop)
        q = queries if stop - start == length else queries[:, :, start:stop]
        k, v = keys, values
        if num_keys < keys.shape[2]:
            k, v = keys[:, :, :num_keys], values[:, :, :num_keys]
        outs.append(softmax2_attention(q, k, v, scale, bias))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _query_block(plan: ForwardPlan, start: int, stop: int) -> tuple[int, mx.array | None]:
    """Keys that queries [start, stop) can see, and their 0/-inf bias (None when every one
    sees all of them); built once per forward and shared by every layer."""
    key = ("query block", start)
    if key not in plan.shared:
        num_keys = plan.key_extent(start, stop)
        mask = plan.causal_mask(start, stop, num_keys)
        bias = None
        if not mask.all():
            bias = mx.array(np.where(mask, 0.0, -np.inf).astype(np.float32)[:, None, None])
        plan.shared[key] = num_keys, bias
    return plan.shared[key]


def _block_indices(plan: ForwardPlan) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
    """Per forward, shared by every layer: the gather_mm indices of `_decode_by_blocks` and
    the additive bias that hides block padding past each row's end (None if there is none)."""
    if "blocks" not in plan.shared:
        blocks = plan.read_rows.astype(mx.uint32)  # [G, Hkv, nb]: row of the (block, head) view
        g, kv_heads, num_blocks = blocks.shape
        pairs = mx.broadcast_to(
            mx.arange(g * kv_heads, dtype=mx.uint32).reshape(g, kv_heads, 1), blocks.shape
        )
        each = mx.arange(g * kv_heads * num_blocks, dtype=mx.uint32).reshape(blocks.shape)
        bias = None
        if int(plan.ends.min()) < plan.num_keys:
            visible = np.arange(plan.num_keys)[None, :] < plan.ends[:, None]
            bias = np.where(visible, 0.0, -np.inf).astype(np.float32)
            bias = mx.array(bias.reshape(g, 1, num_blocks, 1, -1))
        plan.shared["blocks"] = (blocks, pairs, each, bias)
    return plan.shared["blocks"]


def _decode_by_blocks(queries: mx.array, cache: PagedLayerCache, scale: float) -> mx.array:
    """One query per row against its arena blocks in place: `gather_mm` multiplies each
    (row, head) query by each of the row's `[block_size, D]` K and V blocks, so the context
    is never copied into a `[G, H, K, D]` array (that copy and the long matmul over it cost
    ~4x these block products at 1,500 tokens)."""
    arena, layer = cache.arena, cache.layer
    g, h, _, d = queries.shape
    blocks, pairs, each, bias = _block_indices(cache.plan)
    rep, bs = h // blocks.shape[1], arena.block_size
    q = (queries * (scale * _LOG2E)).reshape(-1, rep, d)
    keys = arena.keys[layer].reshape(-1, bs, d)
    values = arena.values[layer].reshape(-1, bs, d)
    scores = mx.gather_mm(q, keys.swapaxes(-1, -2), pairs, blocks)  # [G, Hkv, nb, rep, bs]
    if scores.dtype != mx.float32:
        scores = scores.astype(mx.float32)
    if bias is not None:
        scores = scores + bias
    weights = mx.power(2.0, scores - scores.max(axis=(2, 4), keepdims=True))
    total = weights.sum(axis=(2, 4))  # [G, Hkv, rep]
    weights = weights.astype(values.dtype).reshape(-1, rep, bs)
    out = mx.gather_mm(weights, values, each, blocks).sum(axis=2)  # [G, Hkv, rep, D]
    out = out / total[..., None].astype(values.dtype)
    return out.reshape(g, h, 1, d)


def _fast_attention_call(exact):
    def __call__(self, x, mask=None, cache=None):
        if not (_ARENA.is_on() and isinstance(cache, PagedLayerCache)):
            return exact(self, x, mask=mask, cache=cache)
        b, length, _ = x.shape
        queries = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        out = paged_attention(queries, keys, values, cache, self.scale)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))

    return __call__


def _is_llama_attention(attn) -> bool:
    if _ARENA.is_patched(attn):
        return True
    try:
        return _code_lines(type(attn).__call__) == _LLAMA_CALL
    except (OSError, TypeError):
        return False


def install_fast_attention(module) -> bool:
    """Give each llama-style attention of `module` the switchable arena attention; False
    (and nothing changed) unless every layer's attention is llama's, line for line."""
    layers = getattr(module, "layers", None)
    if not layers:
        return False
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    if not all(a is not None and _is_llama_attention(a) for a in attns):
        return False
    if any(getattr(layer, "use_sliding", False) for layer in layers):
        return False
    _ARENA.patch(attns, _fast_attention_call)
    return True


def fast_attention(enabled: bool = True):
    """Within this block, patched attentions given a `PagedLayerCache` read the arena here."""
    return _ARENA.enabled(enabled)
