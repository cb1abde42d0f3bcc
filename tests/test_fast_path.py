"""The runner's arena attention (models/fast_attention.py) against mlx-lm's exact attention."""

from __future__ import annotations

import cortexlab as cl
from cortexlab.kv.arena import KVArena
from cortexlab.models.base import model_from_module
from cortexlab.models.fast_attention import QUERY_BLOCK, fast_attention, install_fast_attention
from cortexlab.models.tiny import TINY_CONFIG, ByteTokenizer, randomize
from cortexlab.runner import RowWork, Runner

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlx_lm_greedy
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes

CONFIGS = {
    "llama": dict(TINY_CONFIG),
    "qwen2": dict(TINY_CONFIG, model_type="qwen2", tie_word_embeddings=True),
    # mlx-lm loads mistral checkpoints with llama's classes.
    "mistral": dict(TINY_CONFIG, model_type="llama", num_key_value_heads=1),
    # qwen3's attention normalises q and k: it is not llama's, so it keeps mlx-lm's code.
    "qwen3": dict(TINY_CONFIG, model_type="qwen3", head_dim=16),
}


def build(name: str, seed: int = 0) -> cl.Model:
    """A tiny random model of the config's architecture, weights drawn as in `tiny_random`."""
    config = CONFIGS[name]
    model_class, args_class = _get_classes(config)
    module = model_class(args_class.from_dict(config))
    randomize(module, seed=seed)
    mx.eval(module.parameters())
    module.eval()
    return model_from_module(module, ByteTokenizer(), name=name, source=name, config=config)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def llama_like(request):
    return build(request.param)


def make_arena(model: cl.Model, block_size: int) -> KVArena:
    return KVArena(
        num_layers=model.num_layers,
        num_blocks=1000 // block_size + 8,
        block_size=block_size,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
    )


def steps() -> list[list[tuple[int, int, int]]]:
    """Forward after forward, rows as (sequence, offset, new tokens): a prompt longer than two
    query blocks beside a shorter one (padding), a continuation piece beside a decode row
    (mixed prefill and decode), then decode rows at unequal and at equal contexts."""
    long = 2 * QUERY_BLOCK + 22
    return [
        [(0, 0, long), (1, 0, long - 10)],
        [(0, long, 1), (1, long - 10, 40)],
        [(0, long + 1, 1), (1, long + 30, 1)],
        [(0, long + 2, 1), (1, long + 31, 1), (2, 0, 3)],
        [(0, long + 3, 1), (2, 3, 1)],
    ]


def run_steps(model: cl.Model, runner_kwargs: dict, block_size: int) -> list[mx.array]:
    """Logits of every step in `steps`, block tables scattered (reversed) over the arena."""
    runner = Runner(model, make_arena(model, block_size), **runner_kwargs)
    per_seq = -(-300 // block_size)
    tables = [list(range(s * per_seq, (s + 1) * per_seq))[::-1] for s in range(3)]
    rng = np.random.default_rng(1)
    tokens = [rng.integers(0, 256, 300).tolist() for _ in range(3)]
    out = []
    for step in steps():
        rows = [RowWork(tables[s], o, tokens[s][o : o + n], True) for s, o, n in step]
        out.append(runner.forward(rows))
    mx.eval(out)
    return out


@pytest.mark.parametrize("block_size", [1, 16])
def test_fast_attention_matches_exact_attention(llama_like, block_size):
    """Only the attention differs (SiLU exact on both sides): within float rounding of
    mlx-lm's SDPA, and not bit-identical, so the fast path really ran."""
    exact = run_steps(llama_like, dict(fast_activation=False), block_size)
    fast = run_steps(llama_like, dict(fast_activation=False, fast_attention=True), block_size)
    errors = [float(mx.abs(a - b).max()) for a, b in zip(exact, fast, strict=True)]
    assert max(errors) < 1e-4, errors
    assert max(errors) > 0


def test_runner_takes_the_fast_path_by_default(llama_like):
    runner = Runner(llama_like, make_arena(llama_like, 16))
    assert runner.fast_attention and runner.fast_activation
    assert not Runner(llama_like, make_arena(llama_like, 16), fast_activation=False).fast_attention


def test_model_called_directly_keeps_mlx_lm_code():
    """Installing changes nothing outside the runner, even under the switch: a KVCache is
    not the arena's cache, so mlx-lm's own attention runs, bit for bit."""
    model = build("llama", seed=3)
    x = mx.array([list(range(5, 80))])
    before = model.module(x, cache=make_prompt_cache(model.module))
    assert install_fast_attention(model.module)
    with fast_attention(True):
        after = model.module(x, cache=make_prompt_cache(model.module))
    assert mx.array_equal(before, after).item()


def test_other_attention_falls_back_to_mlx_lm():
    model = build("qwen3")
    assert not install_fast_attention(model.module)
    runner = Runner(model, make_arena(model, 16))
    assert not runner.fast_attention
    tokens = list(range(3, 150))
    logits = runner.forward([RowWork(list(range(10)), 0, tokens, True)])[0]
    ref = model.module(mx.array([tokens]))[0, -1]
    assert mx.allclose(logits, ref, atol=1e-4).item()


@pytest.mark.parametrize("config", ["paged-preempt", "prefix-preempt-bs1"])
def test_engine_with_preemption_matches_mlx_lm(llama_like, config):
    """Greedy tokens through preemption and recompute equal mlx-lm generating each alone."""
    settings = {
        "paged-preempt": dict(
            allocator="paged", block_size=16, num_blocks=14, max_num_batched_tokens=64
        ),
        "prefix-preempt-bs1": dict(allocator="prefix", block_size=1, num_blocks=212),
    }[config]
    engine = cl.Engine(llama_like, **settings)
    assert engine.runner.fast_attention
    rng = np.random.default_rng(2)
    # As in test_engine: the longest request (200 + 12 tokens) fits the arena alone, not all.
    prompts = [rng.integers(0, 256, n).tolist() for n in (1, 7, 16, 17, 50, 99, 150, 200)]
    params = cl.SamplingParams(max_tokens=12, ignore_eos=True)
    requests = [engine.submit(p, params) for p in prompts]
    engine.run_until_done()
    assert sum(r.num_preemptions for r in requests) > 0, "the config should force preemption"
    for req, prompt in zip(requests, prompts, strict=True):
        assert req.output_token_ids == mlx_lm_greedy(llama_like, prompt, 12)[0]
