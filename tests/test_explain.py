"""cl.sampling.explain on hand-built logits: who survives, and which stage removed the rest."""

from __future__ import annotations

import cortexlab as cl

import numpy as np
import pandas as pd
import pytest

SP = cl.SamplingParams
# Eight tokens with known probabilities (token i has probability PROBS[i]).
PROBS = np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02])
LOGITS = np.log(PROBS)


def removed(table: pd.DataFrame) -> dict[int, str | None]:
    return {
        int(t): (None if pd.isna(r) else r)
        for t, r in zip(table["token_id"], table["removed_by"], strict=True)
    }


def test_columns_ranks_and_probabilities():
    params = SP(temperature=1.0, top_k=3)
    table = cl.sampling.explain(LOGITS, params)
    assert list(table.columns) == [
        "token_id", "logit", "raw_prob", "raw_rank", "final_prob", "final_rank", "removed_by",
    ]  # fmt: skip
    assert table["token_id"].tolist() == list(range(8))  # raw order
    assert table["raw_rank"].tolist() == list(range(1, 9))
    np.testing.assert_allclose(table["raw_prob"], PROBS, rtol=1e-6)
    np.testing.assert_allclose(table["logit"], LOGITS, rtol=1e-6)
    final = cl.sampling.distribution(LOGITS, params)
    np.testing.assert_allclose(table["final_prob"], final, rtol=1e-12)
    assert table["final_rank"].tolist()[:3] == [1, 2, 3]
    assert table["final_rank"].isna().tolist() == [False] * 3 + [True] * 5
    assert table.attrs["num_kept"] == {"input": 8, "top_k": 3}
    assert table.attrs["fallback"] is False


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # top-k 5 cuts 5..7; top-p 0.6 keeps 0.30 + 0.22 + 0.16 (the token crossing p stays).
        (SP(temperature=1.0, top_k=5, top_p=0.6), {3: "top_p", 4: "top_p", 5: "top_k"}),
        # min-p 0.5: p >= 0.15 stays (0, 1, 2); top-k 6 cuts 6, 7 first.
        (SP(temperature=1.0, top_k=6, min_p=0.5), {3: "min_p", 5: "min_p", 6: "top_k"}),
        # top-p 0.9 keeps 0..5 (0.88 above token 5 is short of 0.9); min-p 0.5 cuts 3..5.
        (SP(temperature=1.0, top_p=0.9, min_p=0.5), {3: "min_p", 5: "min_p", 6: "top_p"}),
    ],
)
def test_the_stage_that_removed_each_token(params, expected):
    table = cl.sampling.explain(LOGITS, params)
    by = removed(table)
    for token, stage in expected.items():
        assert by[token] == stage, (token, by)
    for token in (0, 1, 2):
        assert by[token] is None
    survivors = table.loc[table["removed_by"].isna(), "final_prob"]
    assert survivors.sum() == pytest.approx(1.0) and (survivors > 0).all()
    assert (table.loc[table["removed_by"].notna(), "final_prob"] == 0).all()


def test_order_changes_attribution():
    # Both stages would remove tokens 3..7; the first one in the order gets the credit.
    params = dict(temperature=1.0, top_k=3, min_p=0.5)
    k_first = cl.sampling.explain(LOGITS, SP(**params, order=["top_k", "min_p"]))
    p_first = cl.sampling.explain(LOGITS, SP(**params, order=["min_p", "top_k"]))
    assert set(removed(k_first).values()) == {None, "top_k"}
    assert set(removed(p_first).values()) == {None, "min_p"}
    np.testing.assert_allclose(k_first["final_prob"], p_first["final_prob"])


def test_presets_differ_where_temperature_sits():
    # hf: temperature first, so top-p sees the flattened distribution and keeps more.
    params = SP(temperature=3.0, top_p=0.5)
    hf = cl.sampling.explain(LOGITS, params)
    llama = cl.sampling.explain(LOGITS, SP(temperature=3.0, top_p=0.5, order="llama.cpp"))
    assert hf.attrs["num_kept"]["top_p"] > llama.attrs["num_kept"]["top_p"] == 2
    assert removed(llama)[2] == "top_p" and removed(hf)[2] is None


def test_greedy_keeps_the_argmax_only():
    table = cl.sampling.explain(LOGITS, SP(temperature=0.0), top=3)
    assert table["token_id"].tolist() == [0, 1, 2]
    assert removed(table) == {0: None, 1: "greedy", 2: "greedy"}
    assert table["final_prob"].tolist() == [1.0, 0.0, 0.0]


def test_rows_are_the_top_raw_plus_the_top_survivors():
    # A logit bias lifts token 7 from last to first: it survives and must be listed.
    params = SP(temperature=1.0, top_k=2, logit_bias={7: 3.0})
    table = cl.sampling.explain(LOGITS, params, top=3)
    assert table["token_id"].tolist() == [0, 1, 2, 7]  # raw order
    assert removed(table) == {0: None, 1: "top_k", 2: "top_k", 7: None}
    assert table.set_index("token_id").loc[7, "final_rank"] == 1


def test_stage_columns_tokens_and_input_masks():
    class Spell:
        def decode(self, ids):
            return f"<{ids[0]}>"

    logits = LOGITS.copy()
    logits[1] = -np.inf  # banned before any stage
    params = SP(temperature=2.0, top_k=4, top_p=0.8)
    table = cl.sampling.explain(logits, params, stages=True, tokenizer=Spell())
    assert table["token"].tolist()[:2] == ["<0>", "<2>"]
    assert [c for c in table.columns if c.startswith("p_")] == [
        "p_temperature", "p_top_k", "p_top_p",
    ]  # fmt: skip
    np.testing.assert_allclose(table["p_top_p"], table["final_prob"])
    assert removed(table)[1] == "input"
    assert table.set_index("token_id").loc[1, "raw_prob"] == 0


def test_fully_filtered_row_falls_back_to_the_raw_argmax():
    params = SP(temperature=1.0, allowed_token_ids=[4], banned_token_ids=[4])
    table = cl.sampling.explain(LOGITS, params, top=2)
    assert table.attrs["fallback"] is True
    assert table["final_prob"].tolist() == [1.0, 0.0]
    assert removed(table)[0] is None and removed(table)[1] == "allowed_tokens"


def test_penalties_read_the_history():
    params = SP(temperature=1.0, presence_penalty=2.0, top_k=2)
    table = cl.sampling.explain(LOGITS, params, history=[0, 0])
    assert removed(table)[0] == "top_k"  # the penalty pushed token 0 out of the top 2
    assert table.attrs["num_kept"]["presence_penalty"] == 8


def test_bad_top_is_refused():
    with pytest.raises(ValueError, match="top must be an int >= 1"):
        cl.sampling.explain(LOGITS, SP(), top=0)
