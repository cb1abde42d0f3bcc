"""Stage order: a named preset or any list of stages, chosen per engine and per request.

``"hf"`` (the default) is Hugging Face transformers' order: biases and penalties, then
temperature first among the warpers, then top-k, top-p, min-p, typical, epsilon, eta.
``"llama.cpp"`` is llama.cpp's default sampler chain: penalties and DRY, then the
truncations (top-n-sigma, top-k, typical, top-p, min-p, XTC), temperature last.
``"mlx-lm"`` is mlx-lm's ``make_logits_processors`` + ``make_sampler``: top-p, min-p, XTC,
top-k, then temperature. Stages a preset's source lacks sit where they fit; every preset
holds every built-in stage, so no parameter is silently ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cortexlab.request import SamplingParams
from cortexlab.sampling.base import FunctionStage, Stage, check_vocab, stages

_BIASES = ("logit_bias", "allowed_tokens", "banned_tokens", "min_tokens")
_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty", "dry")

PRESETS: dict[str, tuple[str, ...]] = {
    "hf": (
        *_BIASES,
        *_PENALTIES,
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "top_n_sigma",
        "xtc",
        "mirostat",
    ),
    "llama.cpp": (
        *_BIASES,
        *_PENALTIES,
        "top_n_sigma",
        "top_k",
        "typical_p",
        "top_p",
        "min_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "xtc",
        "temperature",
        "mirostat",
    ),
    "mlx-lm": (
        *_BIASES,
        *_PENALTIES,
        "top_n_sigma",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "top_p",
        "min_p",
        "xtc",
        "top_k",
        "temperature",
        "mirostat",
    ),
}
DEFAULT_ORDER = "hf"
BUILTIN_STAGES: tuple[str, ...] = PRESETS["hf"]


def check_order(order: Any) -> str | tuple:
    """`order` normalised (a preset name, or a tuple of stage names / stages / functions)."""
    if isinstance(order, str):
        if order not in PRESETS:
            raise ValueError(
                f"unknown sampling order {order!r}; presets: {', '.join(PRESETS)} "
                f"(or a list of stage names from: {', '.join(stages.available())})"
            )
        return order
    if not isinstance(order, list | tuple) or not order:
        raise ValueError(
            f"a sampling order is a preset name ({', '.join(PRESETS)}) or a non-empty list "
            f"of stage names, stages or functions fn(logits, batch), got {order!r}"
        )
    for item in order:
        if isinstance(item, str):
            if item not in stages:
                raise ValueError(
                    f"unknown sampling stage {item!r}; available: {', '.join(stages.available())}"
                )
        elif not callable(item):
            raise ValueError(
                f"a sampling order entry must be a stage name or callable, got {item!r}"
            )
    return tuple(order)


def describe(order: str | Sequence) -> str:
    """A short name for an order (for messages)."""
    if isinstance(order, str):
        return repr(order)
    return "[" + ", ".join(s if isinstance(s, str) else stage_name(s) for s in order) + "]"


def stage_name(stage: Any) -> str:
    """The name a stage object reports (its registered name, or its class/function name)."""
    name = getattr(stage, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(stage, "__name__", type(stage).__name__)


_PIPELINES: dict = {}


def resolve(order: str | Sequence) -> list[tuple[str, Stage]]:
    """The stages of `order`, built: ``[(name, stage), ...]``.

    Built once per order and kept while the registered factories stay the same (registering
    a stage again under a name used here rebuilds it).
    """
    entries = PRESETS[order] if isinstance(order, str) else order
    factories = tuple(stages.get(e) if isinstance(e, str) else e for e in entries)
    try:
        cached = _PIPELINES.get(order)
    except TypeError:  # an order holding unhashable stage objects is built every time
        order, cached = None, None
    if cached is not None and cached[0] == factories:
        return cached[1]
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((entry, stages.create(entry)))
        elif hasattr(entry, "is_active"):
            out.append((stage_name(entry), entry))
        else:
            stage = FunctionStage(entry)
            out.append((stage.name, stage))
    if order is not None:
        _PIPELINES[order] = (factories, out)
    return out


def check_params(
    params: SamplingParams, *, order: str | Sequence, vocab_size: int, tokenizer: Any = None
) -> None:
    """ValueError when `params` cannot run: token ids outside the vocabulary, a stage the
    params use that the order leaves out, DRY breakers as text without a tokenizer, or a
    stage's own ``validate(params)`` (e.g. on ``params.extra``) refusing them."""
    check_vocab("logit_bias", params.logit_bias, vocab_size)
    check_vocab("allowed_token_ids", params.allowed_token_ids or (), vocab_size)
    check_vocab("banned_token_ids", params.banned_token_ids, vocab_size)
    # An id the model can never produce would silently never stop the request.
    check_vocab("stop_token_ids", params.stop_token_ids, vocab_size)
    breakers = params.dry_sequence_breakers
    if params.dry_multiplier > 0:
        check_vocab(
            "dry_sequence_breakers", [b for b in breakers if isinstance(b, int)], vocab_size
        )
        if tokenizer is None and any(isinstance(b, str) for b in breakers):
            raise ValueError(
                "SamplingParams.dry_sequence_breakers holds strings but no tokenizer was given "
                "to turn them into token ids (pass token ids, or a tokenizer)"
            )
    pipeline = resolve(order)
    names = {name for name, _ in pipeline}
    for name in BUILTIN_STAGES:
        if name not in names and stages.create(name).is_active(params):
            raise ValueError(
                f"SamplingParams use the {name!r} stage but the sampling order "
                f"{describe(order)} leaves it out"
            )
    for _, stage in pipeline:
        validate = getattr(stage, "validate", None)
        if callable(validate):
            validate(params)
