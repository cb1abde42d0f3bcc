"""Request state machine, derived counts and SamplingParams validation."""

from __future__ import annotations

import dataclasses
import itertools
import random

import cortexlab
from cortexlab.request import (
    TRANSITIONS,
    FinishReason,
    IllegalTransition,
    Request,
    RequestState,
    SamplingParams,
)

import numpy as np
import pytest

S = RequestState

# ---------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------

BAD_VALUES = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", True),
    ("max_tokens", 1.5),
    ("max_tokens", "16"),
    ("max_tokens", None),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "1.0"),
    ("temperature", True),
    ("temperature", None),
    ("temperature", 10**400),
    ("top_k", -1),
    ("top_k", True),
    ("top_k", 2.0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("top_p", True),
    ("top_p", "0.9"),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", True),
    ("seed", 1.0),
    ("seed", "7"),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", b"x"),
    ("stop", None),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", "12"),
    ("stop_token_ids", 3),
    ("stop_token_ids", None),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("ignore_eos", None),
    ("priority", 1.5),
    ("priority", True),
    ("priority", "1"),
    ("tenant", ""),
    ("tenant", 3),
    ("tenant", None),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("typical_p", 0.0),
    ("typical_p", 1.1),
    ("epsilon_cutoff", 1.0),
    ("epsilon_cutoff", -1e-3),
    ("eta_cutoff", 1.0),
    ("top_n_sigma", -1.0),
    ("top_n_sigma", float("inf")),
    ("xtc_threshold", 0.6),
    ("xtc_probability", 1.5),
    ("mirostat_tau", -1.0),
    ("mirostat_eta", 0.0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", float("nan")),
    ("repetition_window", -1),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0),
    ("frequency_penalty", "0.1"),
    ("dry_multiplier", -0.5),
    ("dry_base", 0.9),
    ("dry_allowed_length", 0),
    ("dry_sequence_breakers", "\n"),
    ("dry_sequence_breakers", [""]),
    ("dry_sequence_breakers", [-1]),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"7": 1.0}),
    ("logit_bias", {7: float("nan")}),
    ("logit_bias", {7: float("inf")}),
    ("logit_bias", [(7, 1.0)]),
    ("allowed_token_ids", []),
    ("allowed_token_ids", [-2]),
    ("banned_token_ids", [1.5]),
    ("min_tokens", -1),
    ("min_tokens", 17),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", True),
    ("n", 0),
    ("n", 65),
    ("n", True),
    ("n", 2.0),
    ("order", "vllm"),
    ("order", ["temperature", "no_such_stage"]),
    ("order", []),
    ("order", 3),
    ("extra", [("a", 1)]),
    ("extra", {1: "a"}),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=lambda v: repr(v)[:20])
def test_bad_values_raise_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert f"SamplingParams.{field} must be" in message
    assert message.endswith(f"got {value!r}")


def test_every_field_has_bad_values_listed():
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert fields == {field for field, _ in BAD_VALUES}


def test_message_names_the_allowed_range():
    with pytest.raises(ValueError, match=r"^SamplingParams\.top_p must be in \(0, 1\], got 1\.5$"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"max_tokens must be an int >= 1, got 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"seed must be None or an int in \[0, 2\*\*63\)"):
        SamplingParams(seed=-1)


def test_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (16, 0.0, 0, 1.0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.priority, p.tenant) == (
        (),
        (),
        False,
        0,
        "default",
    )
    assert p.is_greedy


def test_boundary_values_accepted():
    p = SamplingParams(max_tokens=1, top_p=1.0, top_k=0, seed=0, priority=-5)
    assert p.top_p == 1.0
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(top_p=1e-9).top_p == 1e-9


def test_normalisation():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[2, 0]).stop_token_ids == (2, 0)
    p = SamplingParams(temperature=1, top_p=1, max_tokens=np.int64(7), stop_token_ids=[np.int32(3)])
    assert type(p.temperature) is float and type(p.top_p) is float
    assert type(p.max_tokens) is int and p.max_tokens == 7
    assert type(p.stop_token_ids[0]) is int


def test_frozen_and_hashable():
    p = SamplingParams(temperature=0.7, stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    assert p == SamplingParams(temperature=0.7, stop=("x",))
    assert len({p, SamplingParams(temperature=0.7, stop="x")}) == 1


def test_is_greedy():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1.0, top_k=1).is_greedy


# ---------------------------------------------------------------------------------------
# Request state machine
# ---------------------------------------------------------------------------------------

LEGAL = {
    (S.WAITING, S.RUNNING),
    (S.WAITING, S.CANCELLED),
    (S.WAITING, S.FAILED),
    (S.RUNNING, S.FINISHED),
    (S.RUNNING, S.PREEMPTED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.PREEMPTED, S.RUNNING),
    (S.PREEMPTED, S.CANCELLED),
    (S.PREEMPTED, S.FAILED),
}

# A legal path from WAITING to each state, to set up the source of a transition.
PATH = {
    S.WAITING: [],
    S.RUNNING: [S.RUNNING],
    S.PREEMPTED: [S.RUNNING, S.PREEMPTED],
    S.FINISHED: [S.RUNNING, S.FINISHED],
    S.FAILED: [S.FAILED],
    S.CANCELLED: [S.CANCELLED],
}


def make(prompt=(1, 2, 3), **kwargs) -> Request:
    return Request("r1", list(prompt), SamplingParams(**kwargs), arrival_time=0.0)


def request_in(state: RequestState) -> Request:
    r = make()
    for step in PATH[state]:
        r.transition(step)
    assert r.state is state
    return r


def test_table_matches_spec():
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL


@pytest.mark.parametrize(("old", "new"), list(itertools.product(S, S)), ids=str)
def test_transition_matrix(old, new):
    r = request_in(old)
    if (old, new) in LEGAL:
        r.transition(new)
        assert r.state is new
    else:
        with pytest.raises(IllegalTransition) as err:
            r.transition(new)
        assert r.state is old  # a refused move changes nothing
        message = str(err.value)
        assert "'r1'" in message and old.name in message and new.name in message
        assert isinstance(err.value, RuntimeError)


def test_terminal_states():
    assert {s for s in S if s.is_terminal} == {S.FINISHED, S.FAILED, S.CANCELLED}
    assert request_in(S.FINISHED).is_finished
    assert not request_in(S.PREEMPTED).is_finished


def test_transition_accepts_state_strings():
    r = make()
    r.transition("running")
    assert r.state is S.RUNNING


def test_transition_bookkeeping():
    r = make()
    r.transition(S.RUNNING, now=1.5)
    assert r.first_scheduled_time == 1.5
    r.transition(S.PREEMPTED)
    r.transition(S.RUNNING, now=9.0)
    r.transition(S.PREEMPTED)
    assert r.first_scheduled_time == 1.5  # the first scheduling only
    assert r.num_preemptions == 2


def test_finish_and_fail():
    r = request_in(S.RUNNING)
    r.finish(FinishReason.LENGTH, now=4.0)
    assert (r.state, r.finish_reason, r.finish_time) == (S.FINISHED, FinishReason.LENGTH, 4.0)

    r = request_in(S.WAITING)
    r.finish(FinishReason.CANCELLED, now=2.0)
    assert r.state is S.CANCELLED and r.finish_reason is FinishReason.CANCELLED

    r = request_in(S.PREEMPTED)
    r.fail("out of memory", now=3.0)
    assert (r.state, r.finish_reason, r.error, r.finish_time) == (
        S.FAILED,
        FinishReason.ERROR,
        "out of memory",
        3.0,
    )

    r = request_in(S.WAITING)
    with pytest.raises(IllegalTransition):
        r.finish(FinishReason.STOP, now=1.0)  # never ran, so it cannot have stopped
    assert r.finish_time is None and r.finish_reason is None


def test_finish_reason_values():
    assert [f.value for f in FinishReason] == ["stop", "length", "cancelled", "error"]
    assert FinishReason.STOP == "stop"


# ---------------------------------------------------------------------------------------
# Request data and derived properties
# ---------------------------------------------------------------------------------------


def test_initial_fields():
    r = Request(7, [5, 6], SamplingParams(max_tokens=4, seed=11), prompt="hi", arrival_time=2.0)
    assert (r.request_id, r.prompt, r.state, r.arrival_time, r.seed) == (
        7,
        "hi",
        S.WAITING,
        2.0,
        11,
    )
    assert r.output_token_ids == [] and r.block_table == [] and r.token_times == []
    assert (r.num_computed_tokens, r.num_preemptions, r.text) == (0, 0, "")
    assert r.first_scheduled_time is r.first_token_time is r.finish_time is None
    assert r.finish_reason is None and r.error is None


def test_default_params_and_arrival_time():
    r = Request("x", [1])
    assert r.params == SamplingParams()
    assert isinstance(r.arrival_time, float)


def test_derived_counts():
    r = make(prompt=range(10), max_tokens=5)
    r.output_token_ids += [11, 12]
    r.num_computed_tokens = 10
    assert r.num_prompt_tokens == 10
    assert r.num_output_tokens == 2
    assert r.num_tokens == 12
    assert r.all_token_ids == list(range(10)) + [11, 12]
    assert r.max_num_tokens == 15
    assert r.num_uncomputed_tokens == 2
    r.all_token_ids.append(99)  # a copy: the request is not changed
    assert r.num_tokens == 12


def test_prompt_is_copied_and_coerced():
    prompt = np.array([3, 4, 5])
    r = Request("x", prompt)
    prompt[0] = 0
    assert r.prompt_token_ids == [3, 4, 5]
    assert all(type(t) is int for t in r.prompt_token_ids)


def test_is_prefill_rules():
    r = make(prompt=range(8))
    assert r.is_prefill  # nothing computed
    r.num_computed_tokens = 4
    assert r.is_prefill  # mid chunked prefill
    r.num_computed_tokens = 7
    assert r.is_prefill  # one prompt token left, but no output token yet
    r.num_computed_tokens = 8
    r.append_token(42, now=1.0)
    assert not r.is_prefill  # decode: only the newest token is uncomputed
    r.num_computed_tokens = 9
    r.append_token(43, now=2.0)
    assert not r.is_prefill
    # Preempted and recomputed: prompt + generated tokens go through prefill again.
    r.num_computed_tokens = 0
    assert r.is_prefill
    r.num_computed_tokens = r.num_tokens - 2
    assert r.is_prefill
    r.num_computed_tokens = r.num_tokens - 1
    assert not r.is_prefill


def test_append_token_records_times():
    r = make()
    r.append_token(5, now=1.0)
    r.append_token(np.int64(6), now=1.5)
    assert r.output_token_ids == [5, 6] and type(r.output_token_ids[1]) is int
    assert r.token_times == [1.0, 1.5]
    assert r.first_token_time == 1.0


def test_seed_drawn_from_python_random():
    random.seed(0)
    a = [Request(i, [1]).seed for i in range(3)]
    random.seed(0)
    b = [Request(i, [1]).seed for i in range(3)]
    assert a == b
    assert len(set(a)) == 3
    assert all(0 <= s < 2**63 for s in a)
    cortexlab.seed(0)
    assert Request(0, [1]).seed == a[0]


def test_explicit_seed_wins():
    assert make(seed=123).seed == 123


def test_empty_prompt_raises():
    with pytest.raises(ValueError, match="^prompt must contain at least one token$"):
        Request("x", [])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("x", [-1]), "token ids must be >= 0"),
        ((1.5, [1]), "request_id"),
        ((True, [1]), "request_id"),
        (("x", [1], {"temperature": 0.5}), "params"),
    ],
)
def test_bad_request_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        Request(*args)


def test_identity_equality():
    a, b = make(), make()
    assert a != b and a == a
    assert len({a, b}) == 2


def test_no_instance_dict():
    r = make()
    with pytest.raises(AttributeError):
        r.typo_field = 1  # slots catch misspelt attributes


def test_reprs():
    r = make()
    r.append_token(1, now=0.0)
    assert repr(r) == "Request(id='r1', state=WAITING, prompt=3, output=1)"
    r.text = "<b>"
    page = r._repr_html_()
    assert page.startswith("<table>") and "WAITING" in page and "&lt;b&gt;" in page


def test_stage_fields_are_neutral_by_default_and_normalised():
    import pickle

    p = SamplingParams()
    assert (p.min_p, p.typical_p, p.epsilon_cutoff, p.eta_cutoff, p.top_n_sigma) == (0, 1, 0, 0, 0)
    assert (p.xtc_probability, p.mirostat_tau, p.repetition_penalty, p.dry_multiplier) == (
        0,
        0,
        1,
        0,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.min_tokens, p.logprobs) == (0, 0, 0, None)
    assert p.logit_bias == {} and p.extra == {} and p.order is None
    assert p.allowed_token_ids is None and p.banned_token_ids == ()
    q = SamplingParams(
        logit_bias={np.int64(3): 1, 4: float("-inf")},
        extra={"my_stage": [1, 2]},
        order=["temperature", "top_p"],
        dry_sequence_breakers=["\n", np.int32(5)],
        allowed_token_ids=[np.int64(1)],
    )
    assert q.logit_bias == {3: 1.0, 4: float("-inf")} and type(q.logit_bias[3]) is float
    assert q.order == ("temperature", "top_p") and q.dry_sequence_breakers == ("\n", 5)
    assert q.allowed_token_ids == (1,)
    with pytest.raises(TypeError):
        q.logit_bias[5] = 1.0  # type: ignore[index]
    assert pickle.loads(pickle.dumps(q)) == q
    assert hash(q) == hash(dataclasses.replace(q))
    assert q != dataclasses.replace(q, extra={"my_stage": [1, 3]})
