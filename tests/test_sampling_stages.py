"""Every sampling stage on hand-built distributions: definitions, boundaries, robustness,
an empirical draw test, batch invariance, and agreement with mlx-lm's sample_utils."""

from __future__ import annotations

import math

import cortexlab as cl  # noqa: F401  (must come before mlx: it loads the fast BLAS)

# isort: split
from cortexlab.request import SamplingParams as SP
from cortexlab.sampling import (
    PRESETS,
    SamplerState,
    SamplingBatch,
    available,
    check_params,
    distribution,
    run,
    sample,
    stages,
)
from cortexlab.sampling.dry import dry_penalties
from cortexlab.sampling.xtc import coin

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import sample_utils


def support(p: np.ndarray) -> set[int]:
    return set(np.flatnonzero(p > 0).tolist())


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def stage_output(name: str, row, params: SP, state: SamplerState | None = None, **batch_kw):
    """One stage applied to one row (numpy out)."""
    batch = SamplingBatch((params,), (params.seed or 0,), (batch_kw.pop("step", 0),),
                          (state or SamplerState(),), **batch_kw)  # fmt: skip
    x = mx.array(np.asarray(row, dtype=np.float32)[None, :])
    return np.array(stages.create(name)(x, batch))[0]


RNG = np.random.default_rng(7)
ROWS = RNG.normal(0, 2.5, (6, 300)).astype(np.float32)


def test_available_lists_every_stage():
    names = set(available())
    assert set(PRESETS["hf"]) <= names and {"greedy", "categorical"} <= names
    for order in PRESETS.values():
        assert sorted(order) == sorted(PRESETS["hf"]), "every preset holds every stage"
    assert PRESETS["hf"].index("temperature") < PRESETS["hf"].index("top_k")
    assert PRESETS["llama.cpp"][-2:] == ("temperature", "mirostat")


# -- truncations ------------------------------------------------------------------------------


def test_top_k_ties_at_the_boundary_survive():
    row = np.array([3.0, 2.0, 2.0, 2.0, 1.0, 0.0], np.float32)
    assert support(distribution(row, SP(temperature=1.0, top_k=2))) == {0, 1, 2, 3}
    assert support(distribution(row, SP(temperature=1.0, top_k=1))) == {0}
    assert support(distribution(row, SP(temperature=1.0, top_k=4))) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.5, {0}), (0.51, {0, 1}), (0.8, {0, 1}), (0.8001, {0, 1, 2}), (1e-9, {0})]
)
def test_top_p_keeps_the_token_that_crosses_p(top_p, kept):
    row = logits_of([0.5, 0.3, 0.15, 0.05])
    p = distribution(row, SP(temperature=1.0, top_p=top_p))
    assert support(p) == kept
    assert np.allclose(
        p[list(kept)], np.array([0.5, 0.3, 0.15])[: len(kept)] / [0.5, 0.8, 0.95][len(kept) - 1]
    )


def test_min_p_at_the_threshold_stays():
    row = logits_of([0.4, 0.2, 0.1999, 0.1, 0.1001])
    assert support(distribution(row, SP(temperature=1.0, min_p=0.5))) == {0, 1}
    assert support(distribution(row, SP(temperature=1.0, min_p=1.0))) == {0}
    assert support(distribution(row, SP(temperature=1.0, min_p=0.25))) == {0, 1, 2, 3, 4}
    # Relative to the top probability *after* temperature (hf order: temperature first).
    assert support(distribution(row, SP(temperature=0.5, min_p=0.25))) == {0, 1}


def typical_reference(x: np.ndarray, mass: float) -> set[int]:
    """Hugging Face's TypicalLogitsWarper, in numpy."""
    logp = np.log(softmax(x))
    h = -(np.exp(logp) * logp).sum()
    shifted = np.abs(-logp - h)
    order = np.argsort(shifted, kind="stable")
    cumulative = np.cumsum(np.exp(logp[order]))
    last = min(int((cumulative < mass).sum()), len(x) - 1)
    return set(np.flatnonzero(shifted <= shifted[order][last]).tolist())


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_matches_the_definition(mass):
    for row in ROWS:
        assert support(distribution(row, SP(temperature=1.0, typical_p=mass))) == typical_reference(
            row, mass
        )


def test_typical_p_can_drop_the_most_likely_token():
    # A peaked head and a long flat tail: the top token is far less surprising than typical.
    row = np.concatenate([[4.0], np.zeros(200)]).astype(np.float32)
    kept = support(distribution(row, SP(temperature=1.0, typical_p=0.5)))
    assert 0 not in kept and len(kept) > 1


@pytest.mark.parametrize("epsilon", [1e-3, 3e-3, 0.02, 0.9])
def test_epsilon_and_eta_cutoffs(epsilon):
    for row in ROWS[:3]:
        p = softmax(row)
        expected = set(np.flatnonzero(p >= epsilon).tolist()) | {int(p.argmax())}
        assert support(distribution(row, SP(temperature=1.0, epsilon_cutoff=epsilon))) == expected
        h = -(p * np.log(p)).sum()
        eta = min(epsilon, math.sqrt(epsilon) * math.exp(-h))
        expected = set(np.flatnonzero(p >= eta).tolist()) | {int(p.argmax())}
        assert support(distribution(row, SP(temperature=1.0, eta_cutoff=epsilon))) == expected


@pytest.mark.parametrize("n", [0.5, 1.0, 2.0])
def test_top_n_sigma_is_relative_to_the_std_and_ignores_temperature(n):
    row = ROWS[0].copy()
    row[:5] = -np.inf  # masked entries do not count in the mean / std
    finite = row[np.isfinite(row)]
    expected = set(np.flatnonzero(row >= finite.max() - n * finite.std()).tolist())
    for temperature in (0.5, 1.0, 3.0):
        kept = support(distribution(row, SP(temperature=temperature, top_n_sigma=n)))
        assert kept == expected


def test_xtc_removes_top_choices_but_the_weakest():
    row = logits_of([0.4, 0.3, 0.2, 0.1])
    assert support(
        distribution(row, SP(temperature=1.0, xtc_probability=1.0, xtc_threshold=0.15))
    ) == {2, 3}
    # Fewer than two tokens above the threshold: nothing happens.
    assert support(
        distribution(row, SP(temperature=1.0, xtc_probability=1.0, xtc_threshold=0.35))
    ) == {0, 1, 2, 3}
    # EOS is never removed.
    p = distribution(
        row, SP(temperature=1.0, xtc_probability=1.0, xtc_threshold=0.15), eos_token_ids=[0]
    )
    assert support(p) == {0, 2, 3}


def test_xtc_coin_is_seeded_per_row_and_step():
    params = SP(temperature=1.0, xtc_probability=0.3, xtc_threshold=0.15, seed=5)
    flips = [coin(params, 5, step) for step in range(4000)]
    assert flips == [coin(params, 5, step) for step in range(4000)]
    assert abs(np.mean(flips) - 0.3) < 0.03
    row = logits_of([0.4, 0.3, 0.2, 0.1])
    for step in range(20):
        kept = support(distribution(row, params, history=[9] * step))
        assert kept == ({2, 3} if coin(params, 5, step) else {0, 1, 2, 3})
    # A token exactly at the threshold counts as above it (>=, as in the original).
    at = SP(temperature=1.0, xtc_probability=1.0, xtc_threshold=0.1)
    assert support(distribution(logits_of([0.4, 0.3, 0.2, 0.1]), at)) == {3}


def test_mirostat_truncates_by_surprise_and_updates_mu():
    params = SP(temperature=1.0, mirostat_tau=2.0, mirostat_eta=0.5)
    probs = logits_of([0.5, 0.3, 0.15, 0.05])
    state = SamplerState()
    # mu starts at 2 tau = 4 bits: tokens with -log2 p <= 4 (p >= 1/16) stay.
    assert support(distribution(probs, params, state=state)) == {0, 1, 2}
    stage = stages.create("mirostat")
    mu = 4.0
    for p_chosen, kept in [(0.15 / 0.95, {0, 1, 2}), (0.01, {0}), (0.9, {0, 1})]:
        stage.observe(state, params, 0, math.log(p_chosen))
        mu -= 0.5 * (-math.log2(p_chosen) - 2.0)  # mu -= eta * (surprise - tau)
        assert state.stage_state["mirostat"] == pytest.approx(mu)
        assert support(distribution(probs, params, state=state)) == kept, mu
    # The top token survives even when mu is below its surprise.
    state.stage_state["mirostat"] = -5.0
    assert support(distribution(probs, params, state=state)) == {0}


# -- biases, masks, penalties -------------------------------------------------------------------


def test_logit_bias_allowed_banned():
    row = np.zeros(6, np.float32)
    out = stage_output("logit_bias", row, SP(logit_bias={1: 2.5, 4: -math.inf}))
    assert out.tolist() == [0, 2.5, 0, 0, -math.inf, 0]
    assert support(distribution(row, SP(temperature=1.0, allowed_token_ids=[2, 5]))) == {2, 5}
    assert support(distribution(row, SP(temperature=1.0, banned_token_ids=[0, 1]))) == {2, 3, 4, 5}
    # Greedy rows go through them too.
    assert distribution(row, SP(logit_bias={3: 1.0})).argmax() == 3
    with pytest.raises(
        ValueError, match=r"logit_bias: token id 9 is outside the vocabulary \[0, 6\)"
    ):
        distribution(row, SP(logit_bias={9: 1.0}))


def test_min_tokens_suppresses_eos_and_stop_ids_until_n():
    row = np.array([0.0, 5.0, 4.0, 1.0], np.float32)
    params = SP(min_tokens=2, max_tokens=8, stop_token_ids=[2])
    for step, top in [(0, 3), (1, 3), (2, 1)]:
        p = distribution(row, params, history=[0] * step, eos_token_ids=[1])
        assert p.argmax() == top, step
    ignoring = SP(min_tokens=2, ignore_eos=True)
    assert distribution(row, ignoring, history=[], eos_token_ids=[1]).argmax() == 1


def test_repetition_penalty_is_sign_aware_once_per_token_and_windowed():
    row = np.array([2.0, -2.0, 2.0, 1.0, 0.5], np.float32)
    state = SamplerState([0, 0, 0, 1], [3])  # token 0 three times: penalised once
    out = stage_output("repetition_penalty", row, SP(repetition_penalty=2.0), state)
    assert out.tolist() == [1.0, -4.0, 2.0, 0.5, 0.5]
    out = stage_output(
        "repetition_penalty", row, SP(repetition_penalty=2.0, repetition_window=2), state
    )
    assert out.tolist() == [2.0, -4.0, 2.0, 0.5, 0.5]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    row = np.zeros(10, np.float32)
    state = SamplerState([9, 9], [5, 5, 5, 7])
    params = SP(presence_penalty=0.5, frequency_penalty=0.25)
    x = stage_output("presence_penalty", row, params, state)
    assert x[5] == -0.5 and x[7] == -0.5 and x[9] == 0.0
    x = stage_output("frequency_penalty", row, params, state)
    assert x[5] == -0.75 and x[7] == -0.25 and x[9] == 0.0
    state.output.append(7)  # counts follow the list the state references, incrementally
    x = stage_output("frequency_penalty", row, params, state)
    assert x[7] == -0.5 and x[5] == -0.75


def test_dry_penalises_the_token_that_extends_a_repeat():
    params = SP(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=2, dry_sequence_breakers=[99])
    # A B C D ... A B C -> "D" would extend a 3-token repeat: 0.8 * 2 ** (3 - 2).
    state = SamplerState([1, 2, 3, 4, 8, 1, 2], [3])
    assert dry_penalties(state, params) == {4: pytest.approx(1.6)}
    # Shorter than allowed_length: nothing.
    assert dry_penalties(SamplerState([3, 4, 8], [3]), params) == {}
    # A breaker inside the repeat stops the match.
    broken = SP(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=2, dry_sequence_breakers=[1])
    assert dry_penalties(state, broken) == {4: pytest.approx(0.8)}
    row = np.zeros(10, np.float32)
    assert stage_output("dry", row, params, state)[4] == pytest.approx(-1.6)
    # Positions are kept incrementally: 1 2 3 4 8 1 2 3 4 8 1 2 3 repeats 8 tokens before "4".
    state.output += [4, 8, 1, 2, 3]
    assert dry_penalties(state, params) == {4: pytest.approx(0.8 * 2.0 ** (8 - 2))}


def test_dry_breakers_as_text_need_a_tokenizer():
    params = SP(dry_multiplier=1.0)  # default breakers are strings
    with pytest.raises(ValueError, match="dry_sequence_breakers holds strings"):
        check_params(params, order="hf", vocab_size=10)


def test_temperature_zero_stays_greedy():
    params = SP(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9, typical_p=0.1, xtc_probability=1.0,
                mirostat_tau=1.0, top_n_sigma=0.1)  # fmt: skip
    for row in ROWS:
        p = distribution(row, params)
        assert p.argmax() == row.argmax() and p.max() == 1.0
    tokens = sample(mx.array(ROWS), [params] * len(ROWS), list(range(6)), [0] * 6)
    assert np.array(tokens).tolist() == ROWS.argmax(-1).tolist()


# -- order, custom stages ---------------------------------------------------------------------


def test_an_order_missing_a_used_stage_is_refused():
    with pytest.raises(ValueError, match="use the 'top_k' stage but the sampling order"):
        check_params(SP(temperature=1.0, top_k=3), order=("temperature", "top_p"), vocab_size=10)
    check_params(SP(temperature=0.0, top_k=3), order=("temperature",), vocab_size=10)
    with pytest.raises(ValueError, match="unknown sampling stage 'nope'"):
        SP(order=["temperature", "nope"])
    with pytest.raises(
        ValueError, match="SamplingParams.order must be .*unknown sampling order 'vllm'"
    ):
        SP(order="vllm")


def test_a_notebook_stage_with_its_own_parameters():
    @cl.sampling.register("ban_even")
    class BanEven:
        def is_active(self, params):
            return "ban_even" in params.extra

        def validate(self, params):
            if "ban_even" in params.extra and not isinstance(params.extra["ban_even"], bool):
                raise ValueError("SamplingParams.extra['ban_even'] must be a bool")

        def __call__(self, logits, batch):
            on = batch.column(lambda p: bool(p.extra.get("ban_even")))
            even = (mx.arange(logits.shape[-1]) % 2 == 0)[None, :]
            return cl.sampling.base.mask(logits, even & (on > 0))

    order = ("ban_even", *PRESETS["hf"])
    row = np.zeros(6, np.float32)
    params = SP(temperature=1.0, extra={"ban_even": True}, order=order)
    assert support(distribution(row, params)) == {1, 3, 5}
    with pytest.raises(ValueError, match="must be a bool"):
        distribution(row, SP(temperature=1.0, extra={"ban_even": 3}, order=order))

    def halve(logits, batch):  # a plain function is a stage too, active for every row
        return logits * 0.5

    p = distribution(np.array([2.0, 0.0], np.float32), SP(temperature=1.0, order=[halve]))
    assert p == pytest.approx(softmax([1.0, 0.0]))


def test_rows_with_different_orders_share_a_batch():
    params = [
        SP(temperature=0.7, top_k=3, top_p=0.75, seed=1, order=order)
        for order in ("hf", "llama.cpp", "mlx-lm", None)
    ]
    logits = np.tile(logits_of([0.4, 0.3, 0.2, 0.1]), (4, 1))
    together = np.array(sample(mx.array(logits), params, [1, 2, 3, 4], [0] * 4))
    alone = [
        int(sample(mx.array(logits[i : i + 1]), [params[i]], [i + 1], [0])[0]) for i in range(4)
    ]
    assert together.tolist() == alone


# -- robustness -------------------------------------------------------------------------------


def test_nan_and_inf_logits():
    row = np.array([1.0, np.nan, 2.0, -np.inf, 0.5], np.float32)
    for params in (SP(), SP(temperature=1.0, top_p=0.9), SP(temperature=1.0, top_k=2)):
        tokens = np.array(
            sample(mx.array(np.tile(row, (200, 1))), [params] * 200, list(range(200)), [0] * 200)
        )
        assert 1 not in tokens and 3 not in tokens
    certain = np.array([1.0, np.inf, 2.0, np.inf], np.float32)
    tokens = np.array(sample(mx.array(np.tile(certain, (200, 1))), [SP(temperature=1.0)] * 200,
                             list(range(200)), [0] * 200))  # fmt: skip
    assert set(tokens.tolist()) == {1, 3}
    assert distribution(certain, SP(temperature=1.0)).tolist() == [0.0, 0.5, 0.0, 0.5]


def test_a_fully_filtered_row_falls_back_to_the_unfiltered_argmax_and_says_so():
    row = np.array([0.0, 3.0, 1.0, 2.0], np.float32)
    params = SP(temperature=1.0, allowed_token_ids=[2], banned_token_ids=[2])
    batch = SamplingBatch((params, SP(temperature=1.0, seed=3)), (0, 3), (0, 0))
    sampled = run(mx.array(np.stack([row, row])), batch)
    mx.eval(*sampled.arrays)
    first, second = sampled.resolve()
    assert first.token == 1 and first.is_fallback
    assert not second.is_fallback
    assert distribution(row, params).tolist() == [0.0, 1.0, 0.0, 0.0]
    all_nan = np.full(4, np.nan, np.float32)
    assert int(sample(mx.array(all_nan[None]), [SP(temperature=1.0)], [0], [0])[0]) == 0


# -- draws, invariance, shortcuts ---------------------------------------------------------------

MIXED = SP(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3,
           presence_penalty=0.4, frequency_penalty=0.2, seed=11)  # fmt: skip


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_ten_thousand_seeded_draws_match_the_final_distribution():
    row = np.random.default_rng(3).normal(0, 0.6, 64).astype(np.float32)
    prompt, history = [1, 2, 3, 1], [4, 4, 5]
    expected = distribution(row, MIXED, prompt=prompt, history=history)
    num = 10_000
    state = SamplerState(prompt, history)
    tokens = np.array(sample(mx.array(np.tile(row, (num, 1))), [MIXED] * num, list(range(num)),
                             [len(history)] * num, states=[state] * num))  # fmt: skip
    kept = expected > 0
    assert set(tokens.tolist()) <= set(np.flatnonzero(kept).tolist())
    counts = np.bincount(tokens, minlength=64)[kept]
    chi2 = float((((counts - expected[kept] * num) ** 2) / (expected[kept] * num)).sum())
    assert chi2 < chi2_critical(int(kept.sum()) - 1), chi2
    assert kept.sum() > 10
    wrong = np.full(int(kept.sum()), 1.0 / kept.sum())  # the test has teeth: uniform fails
    assert float((((counts - wrong * num) ** 2) / (wrong * num)).sum()) > chi2_critical(
        int(kept.sum()) - 1
    )


def batch_of_others(rng, num: int, vocab: int):
    orders = [None, "llama.cpp", "mlx-lm"]
    params = [
        SP(
            temperature=float(rng.uniform(0.3, 1.5)) if i % 4 else 0.0,
            top_k=int(rng.integers(0, 50)),
            top_p=float(rng.uniform(0.5, 1.0)),
            min_p=float(rng.uniform(0, 0.1)),
            typical_p=1.0 if i % 3 else 0.9,
            order=orders[i % 3],
        )  # fmt: skip
        for i in range(num)
    ]
    return rng.normal(0, 3, (num, vocab)).astype(np.float32), params


@pytest.mark.parametrize("vocab", [500, 40_000])
def test_a_seeded_row_alone_or_among_sixteen_others_gives_the_same_tokens(vocab):
    rng = np.random.default_rng(vocab)
    row = rng.normal(0, 3, vocab).astype(np.float32)
    params = SP(temperature=1.0, top_p=0.95, min_p=0.01, repetition_penalty=1.2, seed=42)
    state = SamplerState([1, 2, 3], [4, 5])
    others, other_params = batch_of_others(rng, 16, vocab)
    for step in range(6):
        alone = sample(mx.array(row[None]), [params], [42], [step], states=[state])
        logits = mx.array(np.concatenate([others[:7], row[None], others[7:]]))
        ps = [*other_params[:7], params, *other_params[7:]]
        mixed = sample(logits, ps, [*range(7), 42, *range(8, 17)], [step] * 17,
                       states=[SamplerState() for _ in range(7)] + [state] + [SamplerState() for _ in range(9)])  # fmt: skip
        assert int(mixed[7]) == int(alone[0]), step


def test_candidate_shortcuts_give_the_exact_tokens():
    # Flat rows need nuclei far beyond 256 candidates: they are retried, never approximated.
    rng = np.random.default_rng(0)
    logits = mx.array(
        np.concatenate([rng.normal(0, 1, (8, 20_000)), rng.normal(0, 6, (8, 20_000))]).astype(
            np.float32
        )
    )
    params = [SP(temperature=float(t), top_p=float(p), top_k=int(k), typical_p=float(tp))
              for t, p, k, tp in zip(rng.uniform(0.5, 1.5, 16), rng.uniform(0.3, 0.99, 16),
                                     [0, 0, 100, 300] * 4, [1.0] * 12 + [0.9] * 4, strict=True)]  # fmt: skip
    seeds, steps = list(range(16)), [3] * 16
    exact = np.array(sample(logits, params, seeds, steps, num_candidates=20_000))
    for num in (256, 8):
        assert (
            np.array(sample(logits, params, seeds, steps, num_candidates=num)).tolist()
            == exact.tolist()
        )


# -- agreement with mlx-lm ----------------------------------------------------------------------


def mlx_lm_distribution(row: np.ndarray, history: list[int], *, temp: float, **kw) -> np.ndarray:
    processors = sample_utils.make_logits_processors(
        logit_bias=kw.pop("logit_bias", None),
        repetition_penalty=kw.pop("repetition_penalty", None),
        repetition_context_size=100,
        presence_penalty=kw.pop("presence_penalty", None),
        presence_context_size=100,
        frequency_penalty=kw.pop("frequency_penalty", None),
        frequency_context_size=100,
    )
    logits = mx.array(row[None])
    for processor in processors:
        logits = processor(mx.array(history), logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if kw.get("top_p"):
        logprobs = sample_utils.apply_top_p(logprobs, kw["top_p"])
    if kw.get("min_p"):
        logprobs = sample_utils.apply_min_p(logprobs, kw["min_p"])
    if kw.get("xtc_probability"):
        logprobs = sample_utils.apply_xtc(logprobs, 1.0, kw["xtc_threshold"], [])
    if kw.get("top_k"):
        logprobs = sample_utils.apply_top_k(logprobs, kw["top_k"])
    return softmax(np.array(logprobs[0] * (1.0 / temp), dtype=np.float64))


AGREEMENT = [
    dict(temp=0.7),
    dict(temp=1.0, top_p=0.8),
    dict(temp=1.3, min_p=0.05),
    dict(temp=0.9, top_k=7),
    dict(temp=1.0, xtc_probability=1.0, xtc_threshold=0.02),
    dict(temp=0.8, top_p=0.9, min_p=0.02, top_k=20),
    dict(temp=1.0, repetition_penalty=1.5),
    dict(temp=1.0, presence_penalty=0.7, frequency_penalty=0.3),
    dict(temp=0.6, logit_bias={3: 4.0, 10: -2.0}, repetition_penalty=1.2, top_p=0.95),
]


@pytest.mark.parametrize("kw", AGREEMENT, ids=lambda kw: ",".join(kw))
def test_final_distribution_agrees_with_mlx_lm(kw):
    rng = np.random.default_rng(1)
    history = rng.integers(0, 200, 30).tolist()
    for row in rng.normal(0, 2, (3, 200)).astype(np.float32):
        theirs = mlx_lm_distribution(row, history, **dict(kw))
        params = dict(kw)
        params["temperature"] = params.pop("temp")
        ours = distribution(row, SP(**params, order="mlx-lm"), history=history)
        assert support(ours) == support(theirs)
        assert np.allclose(ours, theirs, atol=1e-5)


def test_a_stage_object_that_is_not_hashable_plugs_in():
    from dataclasses import dataclass

    @dataclass
    class Shift:  # eq=True makes dataclass instances unhashable
        amount: float

        def is_active(self, params):
            return True

        def __call__(self, logits, batch):
            return logits + mx.array([[0.0, self.amount]])

    order = [Shift(math.log(3.0)), "temperature"]
    tokens = sample(
        mx.zeros((4000, 2)),
        [SP(temperature=1.0)] * 4000,
        list(range(4000)),
        [0] * 4000,
        order=order,
    )
    assert abs(np.array(tokens).mean() - 0.75) < 0.03
