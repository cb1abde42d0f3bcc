"""One request's whole life: sampling parameters, tokens, cache bookkeeping, state machine.

State lives on the request (nano-vllm's ``Sequence``): schedulers and allocators read it,
the engine moves it through the state machine with :meth:`Request.transition`.
"""

from __future__ import annotations

import html
import math
import numbers
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class RequestState(str, Enum):
    """Where a request is in its life; FINISHED, FAILED and CANCELLED are terminal."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for states a request never leaves."""
        return not TRANSITIONS[self]


# Every legal move; anything else raises IllegalTransition. A state with no way out is terminal.
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.WAITING: frozenset(
        {RequestState.RUNNING, RequestState.CANCELLED, RequestState.FAILED}
    ),
    RequestState.RUNNING: frozenset(
        {
            RequestState.FINISHED,
            RequestState.PREEMPTED,
            RequestState.FAILED,
            RequestState.CANCELLED,
        }
    ),
    RequestState.PREEMPTED: frozenset(
        {RequestState.RUNNING, RequestState.CANCELLED, RequestState.FAILED}
    ),
    RequestState.FINISHED: frozenset(),
    RequestState.FAILED: frozenset(),
    RequestState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the request state machine does not allow."""

    def __init__(self, request_id: str | int, old: RequestState, new: RequestState) -> None:
        self.request_id, self.old, self.new = request_id, old, new
        allowed = ", ".join(sorted(s.name for s in TRANSITIONS[old])) or "nothing (terminal)"
        super().__init__(
            f"request {request_id!r}: illegal transition {old.name} -> {new.name} "
            f"(allowed from {old.name}: {allowed})"
        )


class FinishReason(str, Enum):
    """Why a request stopped (OpenAI-style strings)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


# The terminal state each finish reason lands in.
_FINISH_STATE = {
    FinishReason.STOP: RequestState.FINISHED,
    FinishReason.LENGTH: RequestState.FINISHED,
    FinishReason.CANCELLED: RequestState.CANCELLED,
    FinishReason.ERROR: RequestState.FAILED,
}

MAX_SEED = 2**63  # exclusive; fits a signed 64-bit int, which MLX and numpy keys accept


def _fail(field: str, rule: str, value: object) -> ValueError:
    return ValueError(f"SamplingParams.{field} must be {rule}, got {value!r}")


def _is_int(value: object) -> bool:
    # numpy ints count (workloads draw lengths with numpy); bool does not: True as a token
    # budget is almost certainly a bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(field: str, value: object, rule: str, ok: Callable[[int], bool] | None = None) -> int:
    if not _is_int(value) or (ok is not None and not ok(int(value))):
        raise _fail(field, rule, value)
    return int(value)


def _float(field: str, value: object, rule: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(field, rule, value)
    try:
        as_float = float(value)
    except OverflowError:
        raise _fail(field, rule, value) from None
    if not math.isfinite(as_float) or not ok(as_float):
        raise _fail(field, rule, value)
    return as_float


class FrozenMap(Mapping):
    """A read-only, hashable, picklable mapping (``SamplingParams.logit_bias`` and ``extra``)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        try:
            return hash(frozenset(self._data.items()))
        except TypeError:  # unhashable values (an `extra` list): equal maps still hash equal
            return hash(frozenset(self._data))

    def __repr__(self) -> str:
        return repr(self._data)


# OpenAI's limits: penalties in [-2, 2], at most 20 alternatives per token.
MAX_ABS_OPENAI_PENALTY = 2.0
MAX_LOGPROBS = 20
MAX_N = 64  # parallel samples per request (SamplingParams.n)
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to decode one request; validated and normalised at construction.

    Every stage parameter has a neutral default (the stage does nothing). Adding a sampling
    stage means: a field here (with a neutral default and a check in ``__post_init__``) plus
    one file under ``cortexlab/sampling/``; see ``docs/sampling.md`` for the table.

    A value outside its range raises ``ValueError`` naming the field and the range. Floats
    must be finite (``logit_bias`` values may also be ``-inf``); bools are not accepted as
    numbers; lists are stored as tuples and mappings as read-only maps. At submit
    (``Engine.submit`` raises ``ValueError``) the token ids of `logit_bias`,
    `allowed_token_ids`, `banned_token_ids` and, with DRY on, `dry_sequence_breakers` must
    lie in the model's vocabulary, every stage the parameters use must be in the sampling
    order, and each stage's own ``validate(params)`` must accept them. ``docs/engine.md``
    has this list as a table.

    Attributes:
        max_tokens: Most tokens to generate; an int >= 1 (default 16). Prompt plus
            `max_tokens` must fit the model's context and the engine's KV arena, or the
            request fails at submit with the reason.
        temperature: Logits are divided by it; a float >= 0 (default 0.0). 0 decodes
            greedily (argmax) and skips the stages that cannot change an argmax.
        top_k: Keep the k largest logits (ties at the k-th value stay); an int >= 0
            (default 0 = off).
        top_p: Nucleus: keep the most likely tokens until their mass reaches p; in (0, 1]
            (default 1.0 = off).
        seed: Seed of the request's random draws; None or an int in [0, 2**63) (default
            None: drawn from Python's `random` when the request is built, so
            ``cl.seed(n)`` makes unseeded runs repeatable). Sample i of ``n`` uses
            ``(seed + i) mod 2**63``.
        stop: Stop strings; a non-empty str or a list/tuple of them (default none). The
            text is cut before the first one found and the request finishes with "stop".
        stop_token_ids: Token ids that end the request (the token is kept); a list/tuple
            of ints >= 0 (default none).
        ignore_eos: Keep generating past the model's EOS token; a bool (default False).
        priority: Scheduling priority, lower first (the `priority` scheduler); any int
            (default 0).
        tenant: Who sent the request (the `fair` scheduler's key, per-tenant metrics); a
            non-empty str (default "default").
        min_p: Keep tokens with ``p >= min_p * p_max``; in [0, 1] (default 0.0 = off).
        typical_p: Locally typical sampling mass; in (0, 1] (default 1.0 = off).
        epsilon_cutoff: Drop tokens with ``p < epsilon``; in [0, 1) (default 0.0 = off).
        eta_cutoff: Drop tokens with ``p < min(eta, sqrt(eta) * exp(-H))``; in [0, 1)
            (default 0.0 = off).
        top_n_sigma: Keep logits ``>= max - n * std``; a float >= 0 (default 0.0 = off).
        xtc_threshold: XTC removes tokens with ``p >= threshold`` but the least likely of
            them; in [0, 0.5] (default 0.1).
        xtc_probability: Chance per step that XTC acts; in [0, 1] (default 0.0 = off).
        mirostat_tau: Mirostat v2 target surprise in bits; a float >= 0 (default 0.0 =
            off).
        mirostat_eta: Mirostat learning rate; in (0, 1] (default 0.1).
        repetition_penalty: Divides positive and multiplies negative logits of every
            distinct context token; a float > 0 (default 1.0 = off).
        repetition_window: Tokens the repetition penalty looks back over; an int >= 0
            (default 0 = the whole prompt and output).
        presence_penalty: Subtracted once from every token generated so far; in [-2, 2]
            (default 0.0 = off).
        frequency_penalty: Subtracted per occurrence in the output; in [-2, 2] (default
            0.0 = off).
        dry_multiplier: DRY penalty scale; a float >= 0 (default 0.0 = off).
        dry_base: DRY penalty base; a float >= 1 (default 1.75).
        dry_allowed_length: Longest repeat DRY leaves alone; an int >= 1 (default 2).
        dry_sequence_breakers: Where DRY's matching stops; a list/tuple of non-empty str or
            token ids >= 0 (default ``("\\n", ":", '"', "*")``).
        logit_bias: Added to the logits, ``{token_id: bias}``; ids ints >= 0, biases finite
            floats or ``-inf`` to ban (default empty).
        allowed_token_ids: Only these tokens can be drawn; None or a non-empty list/tuple
            of ints >= 0 (default None = all).
        banned_token_ids: These tokens cannot be drawn; a list/tuple of ints >= 0
            (default none).
        min_tokens: EOS and `stop_token_ids` are banned until this many tokens were
            generated; an int in [0, max_tokens] (default 0).
        logprobs: Alternatives reported per output token on ``Result.logprobs``; None or an
            int in [0, 20] (default None: nothing recorded; 0: the chosen token only).
        n: Parallel samples forked after one prefill; an int in [1, 64] (default 1).
        order: Stage order for this request; None (the engine's `sampling_order`), a
            preset name ("hf", "llama.cpp", "mlx-lm") or a non-empty list of stage names,
            stages or functions (default None).
        extra: Parameters for user-written stages; a mapping with str keys (default
            empty).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    priority: int = 0
    tenant: str = "default"
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_n_sigma: float = 0.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    mirostat_tau: float = 0.0
    mirostat_eta: float = 0.1
    repetition_penalty: float = 1.0
    repetition_window: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[str | int, ...] = DEFAULT_DRY_SEQUENCE_BREAKERS
    logit_bias: Mapping[int, float] = field(default_factory=FrozenMap)
    allowed_token_ids: tuple[int, ...] | None = None
    banned_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None
    n: int = 1
    order: str | tuple | None = None
    extra: Mapping[str, Any] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        # One line per field; normalised values are written back past the frozen guard.
        def put(field: str, value: object) -> None:
            object.__setattr__(self, field, value)

        def unit(field: str, rule: str, ok: Callable[[float], bool]) -> None:
            put(field, _float(field, getattr(self, field), rule, ok))

        put("max_tokens", _int("max_tokens", self.max_tokens, "an int >= 1", lambda v: v >= 1))
        unit("temperature", "a finite float >= 0 (0 = greedy)", lambda v: v >= 0)
        put("top_k", _int("top_k", self.top_k, "an int >= 0 (0 disables)", lambda v: v >= 0))
        unit("top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        if self.seed is not None:
            rule = "None or an int in [0, 2**63)"
            put("seed", _int("seed", self.seed, rule, lambda v: 0 <= v < MAX_SEED))
        put("stop", self._normalise_stop(self.stop))
        put("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise _fail("ignore_eos", "a bool", self.ignore_eos)
        put("priority", _int("priority", self.priority, "an int"))
        if not isinstance(self.tenant, str) or not self.tenant:
            raise _fail("tenant", "a non-empty str", self.tenant)
        unit("min_p", "in [0, 1] (0 disables)", lambda v: 0 <= v <= 1)
        unit("typical_p", "in (0, 1] (1 disables)", lambda v: 0 < v <= 1)
        unit("epsilon_cutoff", "in [0, 1) (0 disables)", lambda v: 0 <= v < 1)
        unit("eta_cutoff", "in [0, 1) (0 disables)", lambda v: 0 <= v < 1)
        unit("top_n_sigma", "a finite float >= 0 (0 disables)", lambda v: v >= 0)
        unit("xtc_threshold", "in [0, 0.5]", lambda v: 0 <= v <= 0.5)
        unit("xtc_probability", "in [0, 1] (0 disables)", lambda v: 0 <= v <= 1)
        unit("mirostat_tau", "a finite float >= 0 (target surprise in bits; 0 disables)",
             lambda v: v >= 0)  # fmt: skip
        unit("mirostat_eta", "in (0, 1]", lambda v: 0 < v <= 1)
        unit("repetition_penalty", "a finite float > 0 (1 disables)", lambda v: v > 0)
        rule = "an int >= 0 (0 = the whole prompt and output)"
        put("repetition_window", _int("repetition_window", self.repetition_window, rule,
                                      lambda v: v >= 0))  # fmt: skip
        penalty = f"in [-{MAX_ABS_OPENAI_PENALTY:g}, {MAX_ABS_OPENAI_PENALTY:g}] (0 disables)"
        in_range = lambda v: abs(v) <= MAX_ABS_OPENAI_PENALTY  # noqa: E731
        unit("presence_penalty", penalty, in_range)
        unit("frequency_penalty", penalty, in_range)
        unit("dry_multiplier", "a finite float >= 0 (0 disables)", lambda v: v >= 0)
        unit("dry_base", "a finite float >= 1", lambda v: v >= 1)
        put("dry_allowed_length", _int("dry_allowed_length", self.dry_allowed_length,
                                       "an int >= 1", lambda v: v >= 1))  # fmt: skip
        put("dry_sequence_breakers", self._normalise_breakers(self.dry_sequence_breakers))
        put("logit_bias", self._normalise_logit_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            ids = _token_ids("allowed_token_ids", self.allowed_token_ids, "None or a non-empty")
            if not ids:
                rule = "None or a non-empty list/tuple of ints >= 0"
                raise _fail("allowed_token_ids", rule, self.allowed_token_ids)
            put("allowed_token_ids", ids)
        put("banned_token_ids", _token_ids("banned_token_ids", self.banned_token_ids))
        rule = f"an int in [0, max_tokens={self.max_tokens}]"
        put("min_tokens", _int("min_tokens", self.min_tokens, rule,
                               lambda v: 0 <= v <= self.max_tokens))  # fmt: skip
        if self.logprobs is not None:
            rule = f"None or an int in [0, {MAX_LOGPROBS}]"
            put("logprobs", _int("logprobs", self.logprobs, rule,
                                 lambda v: 0 <= v <= MAX_LOGPROBS))  # fmt: skip
        put("n", _int("n", self.n, f"an int in [1, {MAX_N}]", lambda v: 1 <= v <= MAX_N))
        put("order", self._normalise_order(self.order))
        if not isinstance(self.extra, Mapping) or not all(isinstance(k, str) for k in self.extra):
            raise _fail("extra", "a mapping with str keys (read by the stages)", self.extra)
        put("extra", self.extra if type(self.extra) is FrozenMap else FrozenMap(self.extra))

    @staticmethod
    def _normalise_stop(stop: object) -> tuple[str, ...]:
        rule = "a str or a list/tuple of non-empty str"
        items = (stop,) if isinstance(stop, str) else stop
        if not isinstance(items, list | tuple) or not all(isinstance(s, str) and s for s in items):
            raise _fail("stop", rule, stop)
        return tuple(items)

    @staticmethod
    def _normalise_breakers(breakers: object) -> tuple[str | int, ...]:
        ok = isinstance(breakers, list | tuple) and all(
            (isinstance(b, str) and b) or (_is_int(b) and b >= 0) for b in breakers
        )
        if not ok:
            raise _fail("dry_sequence_breakers", "a list/tuple of non-empty str or token ids",
                        breakers)  # fmt: skip
        return tuple(b if isinstance(b, str) else int(b) for b in breakers)

    @staticmethod
    def _normalise_logit_bias(bias: object) -> FrozenMap:
        rule = "a mapping of token id (int >= 0) -> float (finite, or -inf to ban)"
        if not isinstance(bias, Mapping):
            raise _fail("logit_bias", rule, bias)
        out = {}
        for key, value in bias.items():
            ok_value = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if (
                not (_is_int(key) and key >= 0)
                or not ok_value
                or math.isnan(value)
                or value == math.inf
            ):
                raise _fail("logit_bias", rule, bias)
            out[int(key)] = float(value)
        return bias if type(bias) is FrozenMap and out == dict(bias) else FrozenMap(out)

    @staticmethod
    def _normalise_order(order: object) -> str | tuple | None:
        if order is None:
            return None
        # Imported here: the sampling package imports this module.
        from cortexlab.sampling.order import check_order

        try:
            return check_order(order)
        except ValueError as exc:
            rule = f"None, a preset name or a list of stages ({exc})"
            raise _fail("order", rule, order) from None

    @property
    def is_greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature == 0.0


def _token_ids(field: str, ids: object, prefix: str = "a") -> tuple[int, ...]:
    if not isinstance(ids, list | tuple) or not all(_is_int(i) and i >= 0 for i in ids):
        raise _fail(field, f"{prefix} list/tuple of ints >= 0", ids)
    return tuple(int(i) for i in ids)


def check_token_ids(token_ids: object, vocab_size: int | None = None) -> list[int]:
    """`token_ids` as a list of Python ints, or ValueError naming the first bad one.

    Accepts a list, tuple, range or 1-D numpy array of ints (numpy ints too); floats, bools,
    strings, bytes, nested lists and None are rejected rather than coerced.
    """
    if isinstance(token_ids, str | bytes | bytearray) or not (
        isinstance(token_ids, Sequence) or hasattr(token_ids, "__array__")
    ):
        raise ValueError(
            f"prompt must be a str or a sequence of int token ids, got {type(token_ids).__name__}"
        )
    ids = list(token_ids)
    # Fast path for the common case: a list of plain ints.
    if not all(type(t) is int for t in ids):
        for i, t in enumerate(ids):
            if not _is_int(t):
                raise ValueError(
                    f"prompt token ids must be ints, got {type(t).__name__} {t!r} at position {i}"
                )
        ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("prompt must contain at least one token")
    low, high = min(ids), max(ids)
    if low < 0:
        raise ValueError(f"prompt token ids must be >= 0, got {low} at position {ids.index(low)}")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(
            f"prompt token id {high} at position {ids.index(high)} is outside the vocabulary "
            f"[0, {vocab_size})"
        )
    return ids


class Request:
    """Everything about one request: params, tokens, cache bookkeeping, timings, state.

    Phase rule (``is_prefill``): a request is in *decode* when it already has at least
    one output token and exactly its last token is uncomputed (its K/V not yet in the
    cache); otherwise it is in *prefill*: processing its prompt (possibly in chunks), or
    recomputing prompt + generated tokens after a preemption.

    Equality and hashing are by identity: two requests with the same prompt are distinct.
    """

    __slots__ = (
        "request_id",
        "prompt",
        "prompt_token_ids",
        "params",
        "state",
        "output_token_ids",
        "num_computed_tokens",
        "block_table",
        "num_preemptions",
        "arrival_time",
        "first_scheduled_time",
        "first_token_time",
        "token_times",
        "finish_time",
        "finish_reason",
        "error",
        "exception",
        "text",
        "seed",
        "sampling_state",
        "parent",
        "forks",
        "__weakref__",
    )

    def __init__(
        self,
        request_id: str | int,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Build a WAITING request; `arrival_time` defaults to ``time.perf_counter()``."""
        if not (isinstance(request_id, str) or _is_int(request_id)):
            raise ValueError(f"Request.request_id must be a str or int, got {request_id!r}")
        token_ids = check_token_ids(prompt_token_ids)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Request.params must be a SamplingParams, got {params!r}")
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids: list[int] = token_ids
        self.params = params
        self.state = RequestState.WAITING
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_preemptions = 0
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finish_time: float | None = None
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        # The step error that failed this request (waiting callers re-raise it).
        self.exception: BaseException | None = None
        self.text = ""
        # Drawn from Python's `random` so that cortexlab.seed(n) makes unseeded runs repeatable.
        self.seed: int = params.seed if params.seed is not None else random.getrandbits(63)
        # The sampler's per-request bookkeeping (token counts, stage state, logprobs); it
        # creates this on the request's first sampled step.
        self.sampling_state: Any = None
        # Parallel samples (SamplingParams.n > 1): the first sample is the request itself,
        # the others are forks whose `parent` it is (cortexlab/forks.py).
        self.parent: Request | None = None
        self.forks: tuple[Request, ...] = ()

    @property
    def samples(self) -> list[Request]:
        """This request and its forks (SamplingParams.n of them), in sample order."""
        return [self, *self.forks]

    # -- token counts -------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far (also the step index the sampler uses for the next one)."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_num_tokens(self) -> int:
        """The most tokens this request can ever hold: prompt plus ``params.max_tokens``."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not in the cache yet."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True until the first output token exists, and while more than one token is uncomputed."""
        return self.num_output_tokens == 0 or self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        """True once the request reached a terminal state."""
        return self.state.is_terminal

    # -- state machine ------------------------------------------------------------------
    def transition(self, new_state: RequestState, now: float | None = None) -> None:
        """Move to `new_state` or raise IllegalTransition.

        Entering PREEMPTED counts a preemption; the first RUNNING records
        ``first_scheduled_time`` when `now` is given.
        """
        new_state = RequestState(new_state)
        if new_state not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.request_id, self.state, new_state)
        self.state = new_state
        if new_state is RequestState.PREEMPTED:
            self.num_preemptions += 1
        elif new_state is RequestState.RUNNING and self.first_scheduled_time is None:
            self.first_scheduled_time = now

    def append_token(self, token_id: int, now: float) -> None:
        """Record one generated token and when it was produced."""
        self.output_token_ids.append(int(token_id))
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now

    def finish(self, reason: FinishReason, now: float) -> None:
        """End the request: STOP/LENGTH -> FINISHED, CANCELLED -> CANCELLED, ERROR -> FAILED."""
        reason = FinishReason(reason)
        self.transition(_FINISH_STATE[reason], now)
        self.finish_time = now
        self.finish_reason = reason

    def fail(self, message: str, now: float, exception: BaseException | None = None) -> None:
        """End the request as FAILED with an error message (and the step error, if any)."""
        self.finish(FinishReason.ERROR, now)
        self.error = message
        self.exception = exception

    # -- display ------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id!r}, state={self.state.name}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens})"
        )

    def _repr_html_(self) -> str:
        # Timings are left out on purpose: notebook output must be stable run to run.
        rows = {
            "id": repr(self.request_id),
            "state": self.state.name,
            "prompt tokens": self.num_prompt_tokens,
            "output tokens": self.num_output_tokens,
            "computed tokens": self.num_computed_tokens,
            "blocks": len(self.block_table),
            "preemptions": self.num_preemptions,
            "finish reason": self.finish_reason.value if self.finish_reason else "",
            "text": self.text[:80],
        }
        body = "".join(
            f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in rows.items()
        )
        return f"<table>{body}</table>"


def check_stop(request: Request, token: int, detokenizer, eos_token_ids) -> FinishReason | None:
    """After `token` was appended: extend the request's text; why it stops now, or None.

    EOS (unless ``ignore_eos``) and stop token ids end it with the token kept; a stop string
    ends it with the text cut before the string; ``max_tokens`` ends it at the limit.
    """
    params = request.params
    is_eos = not params.ignore_eos and token in eos_token_ids
    if is_eos or token in params.stop_token_ids:
        request.text += detokenizer.finalize()
        return FinishReason.STOP
    before = len(request.text)
    request.text += detokenizer.add_token(token)
    if params.stop:
        # Only the new tail can complete a stop string.
        start = max(0, before - max(len(s) for s in params.stop) + 1)
        hits = [i for s in params.stop if (i := request.text.find(s, start)) >= 0]
        if hits:
            request.text = request.text[: min(hits)]
            return FinishReason.STOP
    if request.num_output_tokens >= params.max_tokens:
        request.text += detokenizer.finalize()
        return FinishReason.LENGTH
    return None


class RequestTable:
    """Requests by id: the unfinished ones, and a bounded history of those that ended.

    Automatic ids count up from 0 and skip any int id a caller chose, so the two never
    collide. Ended requests beyond the last `max_history` are forgotten (the engine's memory
    stays flat); their ids may then be reused explicitly.
    """

    def __init__(self, *, max_history: int) -> None:
        self.max_history = max_history
        self.active: dict[str | int, Request] = {}
        self.history: OrderedDict[str | int, Request] = OrderedDict()
        self._reserved: set[int] = set()  # explicit int ids the counter must skip
        self._next_id = 0

    def claim_id(self, request_id: str | int | None) -> str | int:
        """A fresh automatic id, or `request_id` checked to be free."""
        if request_id is None:
            while self._next_id in self._reserved:
                self._reserved.discard(self._next_id)
                self._next_id += 1
            self._next_id += 1
            return self._next_id - 1
        if not (isinstance(request_id, str) or _is_int(request_id)):
            raise ValueError(f"request_id must be a str or an int, got {request_id!r}")
        if _is_int(request_id):
            request_id = int(request_id)
        if request_id in self.active or request_id in self.history:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(request_id, int) and request_id == self._next_id:
            # The counter's own next id: step past it (and any reserved run after it), so
            # ids 0, 1, 2, ... given in order reserve nothing and the set stays small.
            self._next_id += 1
            while self._next_id in self._reserved:
                self._reserved.discard(self._next_id)
                self._next_id += 1
        elif isinstance(request_id, int) and request_id > self._next_id:
            self._reserved.add(request_id)
        return request_id

    def add(self, request: Request) -> None:
        """Track a submitted request."""
        self.active[request.request_id] = request

    def retire(self, request: Request) -> None:
        """Move an ended request to the history, forgetting the oldest beyond max_history."""
        self.active.pop(request.request_id, None)
        if self.max_history:
            self.history[request.request_id] = request
            while len(self.history) > self.max_history:
                self.history.popitem(last=False)

    def get(self, request_id: str | int) -> Request:
        """The request under `request_id`, or KeyError saying why it is not known."""
        request = self.active.get(request_id) or self.history.get(request_id)
        if request is None:
            raise KeyError(
                f"request_id {request_id!r} is unknown or no longer kept (the engine keeps "
                f"the last max_history={self.max_history} finished requests)"
            )
        return request
