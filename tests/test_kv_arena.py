"""The KV arena: attention really reads it, and it holds exactly mlx-lm's K/V."""

from __future__ import annotations

import cortexlab as cl
from cortexlab.kv.arena import KVArena, plan_forward

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache


def test_arena_holds_mlx_lm_keys_and_values(tiny):
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, 37)]
    engine = cl.Engine(tiny, block_size=4, num_blocks=64)
    request = engine.submit(prompt, cl.SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # prefill: the prompt's K/V are now in the arena
    assert request.num_computed_tokens == len(prompt)
    cache = make_prompt_cache(tiny.module)
    tiny.module(mx.array([prompt]), cache=cache)
    for layer in range(tiny.num_layers):
        k, v = engine.arena.read(layer, request.block_table, len(prompt))
        ref_k, ref_v = cache[layer].keys, cache[layer].values
        assert mx.allclose(k, ref_k[0, :, : len(prompt)], atol=1e-5).item()
        assert mx.allclose(v, ref_v[0, :, : len(prompt)], atol=1e-5).item()
    engine.cancel(request)
    engine.step()


def test_attention_reads_the_arena(tiny):
    """Overwriting a request's arena blocks changes its next token's logits."""
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 20)]

    def next_logits(corrupt: bool) -> mx.array:
        engine = cl.Engine(tiny, block_size=4, num_blocks=32)
        request = engine.submit(prompt, cl.SamplingParams(max_tokens=4, ignore_eos=True))
        engine.step()
        if corrupt:
            rows = engine.arena.write_rows(request.block_table, 0, len(prompt)).reshape(-1)
            for layer in range(tiny.num_layers):
                engine.arena.values[layer][mx.array(rows.astype(np.int32))] = 0.0
        captured = []
        forward = engine.runner.forward
        engine.runner.forward = lambda rows: captured.append(forward(rows)) or captured[-1]
        engine.step()
        return captured[0]

    clean, corrupted = next_logits(False), next_logits(True)
    assert mx.abs(clean - corrupted).max().item() > 1e-2


def test_blocks_are_shared_by_nobody(tiny):
    """Two requests' K/V land in disjoint arena rows."""
    engine = cl.Engine(tiny, block_size=4, num_blocks=32)
    a = engine.submit([1, 2, 3, 4, 5], cl.SamplingParams(max_tokens=3, ignore_eos=True))
    b = engine.submit([6, 7, 8], cl.SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    rows_a = set(engine.arena.write_rows(a.block_table, 0, 5).ravel())
    rows_b = set(engine.arena.write_rows(b.block_table, 0, 3).ravel())
    assert not rows_a & rows_b
    engine.run_until_done()


def test_plan_masks_padding_and_context():
    arena = KVArena(num_layers=1, num_blocks=8, block_size=2, num_kv_heads=1, head_dim=4)
    # Row 0: 3 cached tokens + 1 new; row 1: 0 cached + 2 new (prefill padding to L=2).
    plan = plan_forward(arena, [[0, 1], [2]], offsets=[3, 0], num_new=[1, 2])
    mask = np.array(plan.mask)[:, 0]
    assert mask.shape == (2, 2, 4)  # G=2, L=2, K=2 blocks x 2
    assert mask[0, 0].tolist() == [True, True, True, True]
    assert mask[0, 1].tolist() == [True, True, True, True]  # padding query: row 0's keys only
    assert mask[1, 0].tolist() == [True, False, False, False]
    assert mask[1, 1].tolist() == [True, True, False, False]
    assert np.array(plan.last_index).tolist() == [0, 1]
    scratch = arena.scratch_block * arena.block_size
    write = np.array(plan.write_rows).reshape(2, 2)
    assert write[0].tolist() == [1 * 2 + 1, scratch]  # position 3 -> block 1, offset 1
    assert write[1].tolist() == [2 * 2 + 0, 2 * 2 + 1]


def test_read_rejects_nothing_silently():
    arena = KVArena(num_layers=1, num_blocks=4, block_size=2, num_kv_heads=2, head_dim=3)
    with pytest.raises(IndexError):
        arena.write_rows([0], 0, 3)  # position 2 needs a second block the table lacks
