"""Runner: forward grouping and logits order."""

from __future__ import annotations

from cortexlab.kv.arena import KVArena
from cortexlab.runner import MAX_PADDING_TOKENS, RowWork, Runner, group_rows, split_waves

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache


@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40))
def test_group_rows_partitions_with_bounded_padding(lengths):
    groups = group_rows(lengths)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))
    singles = [g for g in groups if any(lengths[i] == 1 for i in g)]
    assert len(singles) <= 1 and all(lengths[i] == 1 for g in singles for i in g)
    for g in groups:
        width = max(lengths[i] for i in g)
        assert sum(width - lengths[i] for i in g) <= MAX_PADDING_TOKENS


def test_forward_returns_logits_in_row_order(tiny):
    arena = KVArena(
        num_layers=tiny.num_layers,
        num_blocks=64,
        block_size=4,
        num_kv_heads=tiny.num_kv_heads,
        head_dim=tiny.head_dim,
    )
    runner = Runner(tiny, arena)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (5, 1, 40, 3)]
    tables, start = [], 0
    for p in prompts:
        n = -(-len(p) // 4)
        tables.append(list(range(start, start + n)))
        start += n
    rows = [
        RowWork(t, 0, p, needs_logits=(i != 2))
        for i, (t, p) in enumerate(zip(tables, prompts, strict=True))
    ]
    logits = runner.forward(rows)
    assert logits.shape == (3, tiny.vocab_size)
    for out, i in zip(logits, (0, 1, 3), strict=True):
        ref = tiny.module(mx.array([prompts[i]]), cache=make_prompt_cache(tiny.module))[0, -1]
        assert mx.allclose(out, ref, atol=1e-4).item()


def test_forward_rejects_empty(tiny):
    arena = KVArena(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="rows must not be empty"):
        Runner(tiny, arena).forward([])


def test_split_waves_cuts_long_rows_into_ordered_pieces():
    rows = [RowWork([0], 5, list(range(300)), True), RowWork([1], 0, [7], True)]
    waves = split_waves(rows, chunk=128)
    assert [[(i, p.offset, len(p.token_ids), p.needs_logits) for i, p in w] for w in waves] == [
        [(0, 5, 128, False), (1, 0, 1, True)],
        [(0, 133, 128, False)],
        [(0, 261, 44, True)],
    ]
    assert sum((p.token_ids for w in waves for i, p in w if i == 0), []) == list(range(300))


def test_fast_activation_is_used_by_the_runner_only(tiny):
    """The runner's SiLU on 2**x: within 1e-3 of mlx-lm's exact ops (here ~1e-6), not equal
    (so it is really used), and the model called directly still runs mlx-lm's exact code."""
    from cortexlab.kv.arena import KVArena
    from cortexlab.runner import RowWork, Runner

    import mlx.core as mx

    tokens = list(range(3, 40))

    def logprobs(fast: bool):
        arena = KVArena(
            num_layers=tiny.num_layers,
            num_blocks=8,
            block_size=16,
            num_kv_heads=tiny.num_kv_heads,
            head_dim=tiny.head_dim,
        )
        runner = Runner(tiny, arena, fast_activation=fast)
        assert runner.fast_activation is fast
        lg = runner.forward([RowWork([0, 1, 2], 0, tokens, True)])[0]
        return lg - mx.logsumexp(lg)

    exact, fast = logprobs(False), logprobs(True)
    err = float(mx.abs(exact - fast).max())
    assert 0 < err < 1e-3
    direct = tiny.module(mx.array([tokens]))[0, -1]
    assert float(mx.abs(direct - mx.logsumexp(direct) - exact).max()) < 1e-5
