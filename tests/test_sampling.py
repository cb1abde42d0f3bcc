"""Sampling stages on hand-built logits: exact supports, distributions, per-row seeding."""

from __future__ import annotations

import math

import cortexlab  # noqa: F401  (must come before mlx: it loads the fast BLAS)

# isort: split
from cortexlab.request import SamplingParams
from cortexlab.sampling import PRESETS, SamplingBatch, row_uniform, sample, stages
from cortexlab.sampling.base import exp, mask

import mlx.core as mx
import numpy as np
import pytest

CHI2_DF4_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, p = 0.001


def draw(logits_row, params: SamplingParams, num: int, seed0: int = 0, **kwargs) -> np.ndarray:
    """`num` tokens for one logits row, each row of the batch with its own (seed, step)."""
    logits = mx.broadcast_to(mx.array(logits_row, dtype=mx.float32), (num, len(logits_row)))
    seeds = [seed0 + i // 4 for i in range(num)]  # a mix of distinct seeds and steps
    steps = [i % 4 for i in range(num)]
    out = sample(logits, [params] * num, seeds, steps, **kwargs)
    assert out.dtype == mx.int32 and out.shape == (num,)
    return np.array(out)


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=len(probs))
    expected = probs * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def rand_logits(rows: int, vocab: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, 2, (rows, vocab)).astype(np.float32))


# -- registry and shapes ------------------------------------------------------------------


def test_registry_holds_every_stage():
    assert {"greedy", "temperature", "top_k", "top_p", "categorical"} <= set(stages.available())
    assert set(PRESETS["hf"]) <= set(stages.available())
    with pytest.raises(KeyError, match="available: allowed_tokens, banned_tokens, categorical"):
        stages.get("nope")


def test_empty_batch():
    out = sample(mx.zeros((0, 5)), [], [], [])
    assert out.shape == (0,) and out.dtype == mx.int32


@pytest.mark.parametrize(
    ("logits", "n_params", "n_seeds", "n_steps", "name"),
    [
        (mx.zeros((5,)), 1, 1, 1, "logits"),
        (mx.zeros((1, 2, 5)), 1, 1, 1, "logits"),
        (mx.zeros((2, 5)), 1, 2, 2, "params"),
        (mx.zeros((2, 5)), 2, 3, 2, "seeds"),
        (mx.zeros((2, 5)), 2, 2, 1, "steps"),
    ],
)
def test_shape_validation_names_the_argument(logits, n_params, n_seeds, n_steps, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        sample(logits, [SamplingParams()] * n_params, [0] * n_seeds, [0] * n_steps)


@pytest.mark.parametrize(
    ("params", "seeds", "steps", "name"),
    [
        (["greedy"], [0], [0], "params"),
        ([SamplingParams()], [-1], [0], "seeds"),
        ([SamplingParams()], [2**63], [0], "seeds"),
        ([SamplingParams()], [0], [-1], "steps"),
        ([SamplingParams()], [0], [True], "steps"),
    ],
)
def test_row_input_validation(params, seeds, steps, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        sample(mx.zeros((1, 4)), params, seeds, steps)


# -- greedy -------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = rand_logits(32, 100)
    out = sample(logits, [SamplingParams()] * 32, list(range(32)), [0] * 32)
    assert out.dtype == mx.int32
    assert np.array_equal(np.array(out), np.array(logits).argmax(axis=-1))


def test_greedy_in_half_precision():
    logits = rand_logits(4, 50).astype(mx.bfloat16)
    params = [SamplingParams(), SamplingParams(temperature=1.0)] * 2
    out = np.array(sample(logits, params, [1, 2, 3, 4], [0] * 4))
    expected = np.array(logits.astype(mx.float32)).argmax(axis=-1)
    assert out[0] == expected[0] and out[2] == expected[2]
    assert ((0 <= out) & (out < 50)).all()


def test_greedy_ignores_top_k_top_p_and_seed():
    logits = rand_logits(3, 40, seed=3)
    params = [SamplingParams(top_k=1, top_p=0.1, seed=9)] * 3
    out = sample(logits, params, [1, 2, 3], [5, 6, 7])
    assert np.array_equal(np.array(out), np.array(logits).argmax(axis=-1))


# -- temperature ----------------------------------------------------------------------------

LOGITS5 = np.array([1.0, 0.5, 0.0, -0.5, -1.5], dtype=np.float32)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temperature):
    tokens = draw(LOGITS5, SamplingParams(temperature=temperature), 4000)
    assert chi_square(tokens, softmax(LOGITS5 / temperature)) < CHI2_DF4_P001


def test_distribution_check_can_fail():
    # The same draws at T=2 are far from the T=1 distribution: the chi-square test has teeth.
    tokens = draw(LOGITS5, SamplingParams(temperature=2.0), 4000)
    assert chi_square(tokens, softmax(LOGITS5)) > 10 * CHI2_DF4_P001


def test_masked_tokens_never_drawn():
    row = np.array([0.0, -np.inf, 0.0, -np.inf, -np.inf], dtype=np.float32)
    tokens = draw(row, SamplingParams(temperature=1.0), 2000)
    assert set(tokens.tolist()) == {0, 2}


# -- top-k ----------------------------------------------------------------------------------


def test_top_k_two():
    row = np.array([0.3, 2.0, -1.0, 1.9, 0.0, 1.0], dtype=np.float32)
    tokens = draw(row, SamplingParams(temperature=5.0, top_k=2), 2000)
    assert set(tokens.tolist()) == {1, 3}


def test_top_k_one_is_argmax_and_large_k_is_off():
    row = np.array([0.3, 2.0, -1.0, 1.9], dtype=np.float32)
    assert set(draw(row, SamplingParams(temperature=5.0, top_k=1), 500).tolist()) == {1}
    assert set(draw(row, SamplingParams(temperature=5.0, top_k=50), 1000).tolist()) == {0, 1, 2, 3}


def test_top_k_per_row():
    logits = mx.array(np.tile(np.array([4.0, 3.0, 2.0, 1.0, 0.0], np.float32), (600, 1)))
    ks = [1, 2, 3, 0, 4, 5] * 100
    params = [SamplingParams(temperature=10.0, top_k=k) for k in ks]
    out = np.array(sample(logits, params, list(range(600)), [0] * 600))
    for k in set(ks):
        seen = set(out[np.array(ks) == k].tolist())
        assert seen == set(range(k if k else 5)), (k, seen)


# -- top-p ----------------------------------------------------------------------------------

PROBS4 = np.array([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
    ("top_p", "support"),
    [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.5, {0}), (0.96, {0, 1, 2, 3}), (1e-9, {0})],
)
def test_top_p_minimal_nucleus(top_p, support):
    params = SamplingParams(temperature=1.0, top_p=top_p)
    assert set(draw(np.log(PROBS4), params, 2000).tolist()) == support


def test_top_p_renormalises_inside_nucleus():
    tokens = draw(np.log(PROBS4), SamplingParams(temperature=1.0, top_p=0.81), 4000)
    nucleus = np.append(PROBS4[:3] / PROBS4[:3].sum(), 1e-9)
    counts = np.bincount(tokens, minlength=4)[:3]
    chi2 = (((counts - nucleus[:3] * 4000) ** 2) / (nucleus[:3] * 4000)).sum()
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


def test_top_p_uses_temperature_scaled_distribution():
    # At T=0.5 the probabilities become ~[0.685, 0.247, 0.062, 0.007]: 0.9 needs two tokens,
    # while on the unscaled distribution it would need three.
    params = SamplingParams(temperature=0.5, top_p=0.9)
    assert set(draw(np.log(PROBS4), params, 2000).tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("order", "support"), [("hf", {0, 1}), ("llama.cpp", {0, 1}), ("mlx-lm", {0, 1, 2})]
)
def test_top_p_inside_top_k(order, support):
    # top_k=3 renormalises [0.4, 0.3, 0.2] to [0.44, 0.33, 0.22]: p=0.75 needs two tokens
    # (on the full distribution it would need three). mlx-lm runs top-p before top-k.
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.75)
    assert set(draw(np.log(probs), params, 2000, order=order).tolist()) == support


def test_top_p_full_vocab_and_candidate_paths_agree():
    logits = rand_logits(1, 300, seed=5)
    row = np.array(logits[0])
    full = draw(row, SamplingParams(temperature=1.0, top_p=0.7), 3000)
    with_k = draw(row, SamplingParams(temperature=1.0, top_p=0.7, top_k=299), 3000)
    assert np.array_equal(full, with_k)


def test_top_p_exact_decimal_boundaries():
    # p equal to the sum of the top n decimal probabilities must keep exactly n tokens; in
    # float32 the sums land an ulp either side, which without slack takes one token too many.
    rows, top_ps, sizes = [], [], []
    for a in range(30, 60, 3):
        for b in range(12, a, 4):
            for c in range(8, b, 3):
                d = 100 - a - b - c
                if not 0 < d < c:
                    continue
                probs = np.array([a, b, c, d]) / 100
                for n in (1, 2, 3):
                    rows.append(np.log(probs))
                    top_ps.append(round(float(probs[:n].sum()), 6))
                    sizes.append(n)
    batch = SamplingBatch(
        tuple(SamplingParams(temperature=1.0, top_p=p) for p in top_ps),
        (0,) * len(rows),
        (0,) * len(rows),
    )
    out = stages.create("top_p")(mx.array(np.array(rows, dtype=np.float32)), batch)
    kept = np.isfinite(np.array(out)).sum(axis=-1)
    assert len(rows) > 100
    assert kept.tolist() == sizes


def test_mixed_top_p_rows():
    logits = mx.array(np.tile(np.log(PROBS4).astype(np.float32), (800, 1)))
    ps = [0.5, 0.8, 1.0, 0.81] * 200
    params = [SamplingParams(temperature=1.0, top_p=p) for p in ps]
    out = np.array(sample(logits, params, list(range(800)), [3] * 800))
    expected = {0.5: {0}, 0.8: {0, 1}, 1.0: {0, 1, 2, 3}, 0.81: {0, 1, 2}}
    for p, support in expected.items():
        assert set(out[np.array(ps) == p].tolist()) == support


# -- per-row seeding ------------------------------------------------------------------------

ROW_PARAMS = [
    SamplingParams(temperature=0.9),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=8, top_p=0.8),
]


def test_same_seed_step_row_gives_same_token_anywhere():
    rng = np.random.default_rng(1)
    n, vocab = 48, 32
    rows = rng.normal(0, 2, (n, vocab)).astype(np.float32)
    params = [ROW_PARAMS[i % 4] for i in range(n)]
    seeds = rng.integers(0, 2**63, n).tolist()
    steps = rng.integers(0, 1000, n).tolist()
    alone = [int(sample(mx.array(rows[i : i + 1]), [params[i]], [seeds[i]], [steps[i]])[0])
             for i in range(n)]  # fmt: skip

    # Shuffle, and interleave other rows: greedy ones and random ones with other settings.
    order = rng.permutation(n)
    noise = rng.normal(0, 2, (n, vocab)).astype(np.float32)
    b_rows, b_params, b_seeds, b_steps, where = [], [], [], [], {}
    for j, i in enumerate(order):
        where[i] = len(b_rows)
        b_rows += [rows[i], noise[j]]
        b_params += [params[i], SamplingParams() if j % 2 else SamplingParams(temperature=3.0)]
        b_seeds += [seeds[i], j]
        b_steps += [steps[i], j]
    batched = np.array(sample(mx.array(np.stack(b_rows)), b_params, b_seeds, b_steps))
    assert [int(batched[where[i]]) for i in range(n)] == alone


def test_sequences_depend_on_seed_only():
    logits = mx.zeros((1, 64))  # uniform: every draw is pure seed randomness
    params = [SamplingParams(temperature=1.0)]

    def sequence(seed: int) -> list[int]:
        return [int(sample(logits, params, [seed], [step])[0]) for step in range(32)]

    assert sequence(1) == sequence(1)
    assert sequence(1) != sequence(2)
    assert len(set(sequence(3))) > 16  # steps give fresh randomness, not a constant token


def test_global_mlx_rng_does_not_matter():
    logits = rand_logits(4, 30, seed=2)
    params = [SamplingParams(temperature=1.0)] * 4
    mx.random.seed(0)
    a = np.array(sample(logits, params, [1, 2, 3, 4], [0, 1, 2, 3]))
    mx.random.seed(123)
    b = np.array(sample(logits, params, [1, 2, 3, 4], [0, 1, 2, 3]))
    assert np.array_equal(a, b)


def test_row_uniform():
    values = [row_uniform(seed, step) for seed in range(50) for step in range(50)]
    assert all(0.0 <= u < 1.0 for u in values)
    assert len(set(values)) > 2490  # 24-bit values: a handful of collisions at most
    assert abs(np.mean(values) - 0.5) < 0.02
    assert row_uniform(7, 3) == row_uniform(7, 3)
    assert row_uniform(2**63 - 1, 10**9) < 1.0


# -- stage contract and helpers ---------------------------------------------------------------


def test_custom_stage_plugs_into_chain():
    class BanToken:
        def __init__(self, token: int) -> None:
            self.token = token

        def is_active(self, params: SamplingParams) -> bool:
            return True

        def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
            banned = mx.arange(logits.shape[-1]) == self.token
            return mask(logits, banned[None, :])

    row = np.array([5.0, 1.0, 0.0], dtype=np.float32)
    tokens = draw(row, SamplingParams(), 10, order=(*PRESETS["hf"], BanToken(0)))
    assert set(tokens.tolist()) == {1}  # greedy rows also go through active stages


def test_exp_and_mask_helpers_match_reference():
    x = mx.array(np.linspace(-80, 20, 1001, dtype=np.float32))
    assert np.allclose(np.array(exp(x)), np.exp(np.array(x, dtype=np.float64)), rtol=1e-5)
    assert float(exp(mx.array(-math.inf))) == 0.0
    drop = x > 0
    assert np.array_equal(np.array(mask(x, drop)), np.array(mx.where(drop, -math.inf, x)))
