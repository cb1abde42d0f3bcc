"""Simulated execution: a cost model of each step's batch instead of a forward pass.

``Engine(model, clock="simulated", cost_model=...)`` swaps the `Runner` for a
`SimulatedRunner`: the scheduler, allocator, hooks and Trace run unchanged, but no forward
pass runs and nothing is written to the KV arena; each step lasts what the `CostModel`
says its batch costs, and every sampled row gets one placeholder token (never EOS), so a
workload's request (``max_tokens = output_len``, ``ignore_eos``) emits exactly its output
length. The cost model is linear in a few batch features, with named coefficients that
`calibrate` (cortexlab/calibration.py) fits to the real engine's step times on this
machine; a calibration of the embedded model ships (`default_cost_model`,
``cost_model="default"``). `roofline` (cortexlab/roofline.py) estimates one for named
hardware from a model's shapes instead, and `shaped_model` simulates a model whose weights
are not here. Guide: docs/sim.md.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cortexlab.models.base import Model
from cortexlab.roofline import (
    HARDWARE,
    MODEL_SHAPES,
    Hardware,
    ModelShape,
    ShapedModel,
    get_hardware,
    get_shape,
    kv_budget,
    roofline,
    shaped_model,
)
from cortexlab.runner import ATTENTION_CHUNK, MAX_PADDING_TOKENS, RowWork, group_rows
from cortexlab.sampling import Sampler

import mlx.core as mx
import numpy as np

__all__ = [
    "HARDWARE",
    "MODEL_SHAPES",
    "CALIBRATION_ENGINE",
    "CALIBRATION_SCHEDULERS",
    "DEFAULT_GRID",
    "FIDELITY_METRICS",
    "FIDELITY_PERCENTILES",
    "BatchFeatures",
    "CostModel",
    "Hardware",
    "ModelShape",
    "NullArena",
    "ShapedModel",
    "SimulatedRunner",
    "SimulatedSampler",
    "batch_features",
    "calibrate",
    "calibration_workloads",
    "default_cost_model",
    "fidelity",
    "get_hardware",
    "get_shape",
    "kv_budget",
    "load_factor",
    "model_identity",
    "placeholder_token",
    "probe_seconds",
    "profile_engine",
    "roofline",
    "shaped_model",
    "shipped_path",
    "warm_up",
]

FORMAT = "cortexlab.sim.CostModel"
FORMAT_VERSION = 2
# A logit gap no sampling stage closes: penalties and biases move logits by a few units, so
# greedy and random sampling alike pick the placeholder token.
_PLACEHOLDER_GAP = 1e4


def _check_seconds(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number >= 0, else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class BatchFeatures(NamedTuple):
    """What a step's batch costs depend on, in the real runner's terms."""

    num_prefill_tokens: int  # new tokens of rows with more than one (prompt chunks)
    num_decode_rows: int  # rows with exactly one new token (decodes; run as one group)
    num_context_tokens: int  # sum over rows of cached + new tokens: the keys attended
    num_padding_tokens: int  # slots the runner pads its groups with (computed, discarded)
    num_sampled_rows: int  # rows whose logits are sampled
    num_forwards: int  # forward passes the runner makes (groups x attention waves)
    # (query, key) pairs attention scores: a row with c cached and n new tokens has
    # n*c + n(n+1)/2 (causal); equals num_context_tokens for an all-decode step.
    num_attention_pairs: int = 0


def _layout(lengths: Sequence[int], chunk: int) -> tuple[int, int]:
    """(padding tokens, forward passes) of the real runner for rows of these lengths:
    rows cut into `chunk`-token pieces (waves), each wave grouped by `group_rows`."""
    padding = forwards = 0
    wave = list(lengths)
    while wave:
        pieces = [min(n, chunk) for n in wave]
        groups = group_rows(pieces, MAX_PADDING_TOKENS)
        forwards += len(groups)
        for group in groups:
            sizes = [pieces[i] for i in group]
            padding += max(sizes) * len(sizes) - sum(sizes)
        wave = [n - chunk for n in wave if n > chunk]
    return padding, forwards


def batch_features(rows: Sequence[RowWork], chunk: int = ATTENTION_CHUNK) -> BatchFeatures:
    """The features of one step's rows (as the engine hands them to a runner that cuts
    prompts into `chunk`-token pieces: `Runner.attention_chunk`)."""
    lengths = [len(r.token_ids) for r in rows]
    num_decode = lengths.count(1)
    if num_decode == len(lengths):
        padding, forwards = 0, 1 if lengths else 0  # the common all-decode step: one group
    else:
        padding, forwards = _layout(lengths, chunk)
    return BatchFeatures(
        num_prefill_tokens=sum(lengths) - num_decode,
        num_decode_rows=num_decode,
        num_context_tokens=sum(r.offset for r in rows) + sum(lengths),
        num_padding_tokens=padding,
        num_sampled_rows=sum(1 for r in rows if r.needs_logits),
        num_forwards=forwards,
        num_attention_pairs=sum(
            n * r.offset + n * (n + 1) // 2 for r, n in zip(rows, lengths, strict=True)
        ),
    )


def model_identity(model: Model) -> dict:
    """What a calibration depends on: the model's name and shapes (not its weights' values)."""
    s = model.summary()
    keys = ("name", "layers", "kv_heads", "head_dim", "vocab", "dtype", "parameters")
    return {k: s[k] for k in keys}


# Coefficient name -> the feature it multiplies (None: once per non-empty step).
_TERMS = {
    "step_s": None,
    "forward_s": "num_forwards",
    "prefill_token_s": "num_prefill_tokens",
    "decode_row_s": "num_decode_rows",
    "context_token_s": "num_context_tokens",
    "padding_token_s": "num_padding_tokens",
    "sampled_row_s": "num_sampled_rows",
    "attention_pair_s": "num_attention_pairs",
}
# Version 1 files predate the attention term (read with attention_pair_s = 0).
_TERMS_V1 = tuple(name for name in _TERMS if name != "attention_pair_s")


@dataclass(slots=True)
class CostModel:
    """A step's duration in seconds: ``step_s + sum(coefficient x feature)``.

    Each coefficient is seconds per unit of its `BatchFeatures` field (``forward_s`` per
    forward pass, ``prefill_token_s`` per prompt token, ...); all finite and >= 0. `model`
    is the identity (`model_identity`) of the model it was calibrated on, or None for a
    hand-written or hypothetical one; `info` says how it was made (workloads, machine, fit).

    `memory` (None for a calibrated, linear model) makes it a roofline: the coefficients
    above are then the compute side (``step_s`` a fixed overhead) and `memory` holds the
    seconds of bytes moved, by the same names (its ``step_s``: per step), and a step lasts
    ``step_s + max(compute, memory)`` (see `cortexlab.roofline`).
    """

    step_s: float = 0.0
    forward_s: float = 0.0
    prefill_token_s: float = 0.0
    decode_row_s: float = 0.0
    context_token_s: float = 0.0
    padding_token_s: float = 0.0
    sampled_row_s: float = 0.0
    attention_pair_s: float = 0.0
    model: dict | None = None
    info: dict = field(default_factory=dict)
    memory: dict | None = None

    def __post_init__(self) -> None:
        for name in _TERMS:
            setattr(self, name, _check_seconds(f"CostModel.{name}", getattr(self, name)))
        if self.model is not None and not isinstance(self.model, dict):
            raise ValueError(f"CostModel.model must be a dict or None, got {self.model!r}")
        if not isinstance(self.info, dict):
            raise ValueError(f"CostModel.info must be a dict, got {self.info!r}")
        if self.memory is not None:
            allowed = list(_TERMS)
            if not isinstance(self.memory, Mapping) or not set(self.memory) <= set(allowed):
                raise ValueError(
                    f"CostModel.memory must be None or a dict with keys among {allowed}, "
                    f"got {self.memory!r}"
                )
            self.memory = {
                name: _check_seconds(f"CostModel.memory[{name!r}]", self.memory[name])
                for name in allowed
                if name in self.memory
            }

    @property
    def coefficients(self) -> dict[str, float]:
        """Coefficient name -> value (the compute side of a roofline)."""
        return {name: getattr(self, name) for name in _TERMS}

    @property
    def attention_chunk(self) -> int:
        """Prompt piece size of the runner it was calibrated on (`Runner.attention_chunk`,
        recorded in `info`; the generic path's for a hand-written model): steps it prices
        count forwards and padding in that layout."""
        return int(self.info.get("attention_chunk", ATTENTION_CHUNK))

    @property
    def is_roofline(self) -> bool:
        """True when a step lasts ``step_s + max(compute, memory)`` (`memory` is set)."""
        return self.memory is not None

    def __call__(self, features: BatchFeatures) -> float:
        """Seconds a step with these features takes (0 for an empty batch)."""
        if features.num_prefill_tokens + features.num_decode_rows == 0:
            return 0.0
        compute = (
            self.forward_s * features.num_forwards
            + self.prefill_token_s * features.num_prefill_tokens
            + self.decode_row_s * features.num_decode_rows
            + self.context_token_s * features.num_context_tokens
            + self.padding_token_s * features.num_padding_tokens
            + self.sampled_row_s * features.num_sampled_rows
            + self.attention_pair_s * features.num_attention_pairs
        )
        if self.memory is None:
            return self.step_s + compute
        memory = sum(
            v if _TERMS[k] is None else v * getattr(features, _TERMS[k])
            for k, v in self.memory.items()
        )
        return self.step_s + max(compute, memory)

    def scaled(self, factor: float) -> CostModel:
        """This cost model with every step `factor` times as long (a machine that much
        slower, e.g. busier than when it was calibrated); `info` records the factor."""
        factor = _check_seconds("scaled factor", factor)
        memory = None if self.memory is None else {k: v * factor for k, v in self.memory.items()}
        return CostModel(
            **{k: v * factor for k, v in self.coefficients.items()},
            model=self.model,
            info={**self.info, "scaled": factor * self.info.get("scaled", 1.0)},
            memory=memory,
        )

    def predict(self, rows: Sequence[RowWork]) -> float:
        """Seconds a step over these rows takes."""
        return self(batch_features(rows, self.attention_chunk))

    def check_model(self, model: Model, source: str = "this cost model") -> None:
        """ValueError if this cost model was calibrated on a model other than `model`."""
        if self.model is None:
            return
        mine = model_identity(model)
        if self.model != mine:
            diff = {k: (self.model.get(k), mine[k]) for k in mine if self.model.get(k) != mine[k]}
            detail = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{source} was calibrated on model {self.model.get('name')!r}, not on "
                f"{mine['name']!r} ({detail}); calibrate this model with cl.sim.calibrate(model) "
                "or `cortexlab calibrate --model ...`"
            )

    def to_dict(self) -> dict:
        """The JSON-able form `save` writes."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "coefficients": self.coefficients,
            "memory": self.memory,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write this cost model as a small JSON file; returns its path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "cost model") -> CostModel:
        """A cost model from `to_dict`'s form (this version or 1); ValueError naming what is
        wrong."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a cortexlab cost model (no format {FORMAT!r})")
        version = data.get("version")
        if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
            raise ValueError(
                f"{source} has format version {version!r}; this cortexlab reads versions 1 "
                f"to {FORMAT_VERSION}: recalibrate with cl.sim.calibrate(model) or "
                "`cortexlab calibrate`"
            )
        names = _TERMS_V1 if version == 1 else tuple(_TERMS)
        coefficients = data.get("coefficients")
        if not isinstance(coefficients, Mapping) or set(coefficients) != set(names):
            raise ValueError(
                f"{source}: coefficients must be exactly {sorted(names)} (version {version}), "
                f"got {sorted(coefficients) if isinstance(coefficients, Mapping) else coefficients!r}"
            )
        try:
            return cls(
                **coefficients,
                model=data.get("model"),
                info=dict(data.get("info") or {}),
                memory=data.get("memory"),
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None) -> CostModel:
        """Read a cost model saved by `save`; with `model`, refuse one calibrated on another."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read cost model file {str(path)!r}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"cost model file {str(path)!r} is not valid JSON: {exc}") from None
        cost_model = cls.from_dict(data, source=f"cost model file {str(path)!r}")
        if model is not None:
            cost_model.check_model(model, source=f"cost model file {str(path)!r}")
        return cost_model

    @classmethod
    def fit(
        cls,
        features: Sequence[BatchFeatures],
        durations: Sequence[float],
        *,
        model: dict | None = None,
        info: Mapping | None = None,
        match_total: bool = False,
    ) -> CostModel:
        """Non-negative least squares of `durations` on `features` (relative error weighted).

        `match_total` then scales every coefficient so the predicted durations sum to the
        measured ones: the relative fit sets the shape, the total removes its bias towards
        the many short steps (noise on a busy machine only lengthens steps, and a
        simulated run's latencies are sums of step times)."""
        if len(features) != len(durations) or len(features) == 0:
            raise ValueError(
                f"fit needs as many durations as features (at least one), got "
                f"{len(features)} features and {len(durations)} durations"
            )
        y = np.asarray(durations, dtype=np.float64)
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise ValueError("fit: durations must be finite and > 0")
        x = np.array(
            [[1.0 if f is None else getattr(b, f) for f in _TERMS.values()] for b in features],
            dtype=np.float64,
        )
        # Weight each point by 1/duration: a 5 ms step matters as much as a 500 ms one.
        coef = _nnls(x / y[:, None], np.ones_like(y))
        scale = 1.0
        if match_total:
            # Gross outliers (a step that ran into a burst of other work, 5x its median
            # ratio and more) would set the total alone: they are left out of it.
            fitted_y = x @ coef
            ratio = y / np.maximum(fitted_y, 1e-12)
            kept = ratio <= 5 * np.median(ratio)
            if fitted_y[kept].sum() > 0:
                scale = float(y[kept].sum() / fitted_y[kept].sum())
        coef = coef * scale
        fitted = dict(zip(_TERMS, coef.tolist(), strict=True))
        predicted = x @ coef
        error = np.abs(predicted - y) / y
        meta = {"num_points": len(y), "max_rel_error": float(error.max())}
        meta |= {"total_scale": scale} if match_total else {}
        meta["mean_rel_error"] = float(error.mean())
        return cls(**fitted, model=model, info={**meta, **(info or {})})

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th>{k}</th><td>{v:.4g}</td></tr>" for k, v in self.coefficients.items()
        )
        name = self.model.get("name") if self.model else "no model"
        kind = "roofline" if self.is_roofline else "linear"
        return f"<b>CostModel ({name}, {kind})</b><table>{rows}</table>"


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||a x - b|| with x >= 0 (Lawson-Hanson active set; scipy is not a dependency)."""
    # Columns differ by orders of magnitude (tokens vs rows): solve on unit-norm columns.
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    a = a / norms
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    tol = 1e-10 * max(1.0, float(np.abs(a).max()))
    for _ in range(3 * n):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            # Step back to the boundary and drop the coefficients that went negative.
            bad = passive & (z <= 0)
            alpha = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + alpha * (z - x)
            passive &= x > tol
    return x / norms


class NullArena:
    """The KV arena of a simulated engine: sized like the real one, holding no memory."""

    def __init__(self, *, num_blocks: int, block_size: int, **_: Any) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.capacity = num_blocks
        self.keys: list = []
        self.values: list = []

    @property
    def arrays(self) -> list:
        """No arrays: nothing to evaluate with a step."""
        return []

    @property
    def nbytes(self) -> int:
        """Bytes held: none."""
        return 0

    def ensure(self, max_block_id: int) -> None:
        """Nothing to grow (block ids are still checked against the arena)."""
        if not 0 <= max_block_id < self.num_blocks:
            raise IndexError(f"block id {max_block_id} is outside the arena [0, {self.num_blocks})")

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Nothing to copy: no K/V is stored."""


def placeholder_token(model: Model) -> int:
    """The token every simulated row emits: the lowest id that is not an end of sequence."""
    return _first_non_eos(model.vocab_size, model.tokenizer)


def _first_non_eos(vocab_size: int, tokenizer: Any) -> int:
    eos = set(getattr(tokenizer, "eos_token_ids", None) or ())
    return next(t for t in range(vocab_size) if t not in eos)


class _Placeholders:
    """A simulated step's draw: nothing to evaluate, the placeholder for every row."""

    arrays: list = []

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows


class SimulatedSampler(Sampler):
    """A Sampler whose draw is the placeholder token, with no MLX work and no sync.

    Waking MLX for one tiny eval per step costs milliseconds on a busy CPU, more than the
    rest of a simulated step. Params are still checked at submit; while the
    ``sampler.distribution`` hook listens (``Trace(tokens=True)``) the real sampler runs on
    the placeholder logits instead, so its records keep their usual form.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token = _first_non_eos(self.vocab_size, self.tokenizer)

    def sample(self, logits: mx.array, requests: Sequence, *, record: bool = False) -> Any:
        """The placeholder for each request, or the real sampler's draw when recording."""
        if record:
            return super().sample(logits, requests, record=True)
        return _Placeholders(len(requests))

    def commit(self, sampled: Any, requests: Sequence) -> tuple[list[int], list[dict]]:
        """The tokens (all the placeholder) and, when recording, the distribution rows."""
        if isinstance(sampled, _Placeholders):
            return [self.token] * sampled.num_rows, []
        return super().commit(sampled, requests)


class SimulatedRunner:
    """The Runner's interface without a forward pass: logits that pick a placeholder token,
    and a step duration from the cost model."""

    def __init__(self, model: Model, cost_model: CostModel) -> None:
        self.model = model
        self.cost_model = cost_model
        self.token = placeholder_token(model)
        row = np.full((1, model.vocab_size), -_PLACEHOLDER_GAP, dtype=np.float32)
        row[0, self.token] = 0.0
        self._row = mx.array(row)
        mx.eval(self._row)
        self._logits: dict[int, mx.array] = {}  # rows -> the broadcast logits, built once
        self._duration = 0.0
        self.last_features: BatchFeatures | None = None

    def forward(self, rows: list[RowWork]) -> mx.array:
        """Placeholder logits [R, V] for the rows with `needs_logits`; prices the step."""
        if not rows:
            raise ValueError("rows must not be empty")
        features = self.last_features = batch_features(rows, self.cost_model.attention_chunk)
        self._duration = self.cost_model(features)
        n = features.num_sampled_rows
        logits = self._logits.get(n)
        if logits is None:
            logits = self._logits[n] = mx.broadcast_to(self._row, (n, self.model.vocab_size))
        return logits

    def elapsed(self, t0: float) -> float:
        """The step's simulated duration (0 for a step that ran nothing); resets it."""
        duration, self._duration = self._duration, 0.0
        return duration


def check_simulation(clock: str, cost_model: Any, model: Model) -> CostModel | None:
    """The engine's cost model: required with ``clock="simulated"``, refused otherwise.

    ``"default"`` is the calibration shipped for `model` (`default_cost_model`); another
    string or a path is loaded with `CostModel.load` (refusing one calibrated on another
    model). A weightless `ShapedModel` runs only on the simulated clock.
    """
    if clock != "simulated":
        if isinstance(model, ShapedModel):
            raise ValueError(
                f"{model.name} is a shape without weights (cl.sim.shaped_model): run it with "
                "clock='simulated' (backend='sim') and a cost model such as "
                "cl.sim.roofline(shape, 'h100')"
            )
        if cost_model is not None:
            raise ValueError(f"cost_model is only used with clock='simulated', got clock={clock!r}")
        return None
    if cost_model is None:
        raise ValueError(
            "clock='simulated' needs a cost_model: cost_model='default' for the calibration "
            "shipped with cortexlab (the embedded model), load one with "
            "cl.sim.CostModel.load(path), fit one on this machine with "
            "cl.sim.calibrate(model) (or `cortexlab calibrate`), estimate one for named "
            "hardware with cl.sim.roofline(shape, 'h100'), or write coefficients by hand, e.g. "
            "cl.sim.CostModel(step_s=0.005, prefill_token_s=1e-4, decode_row_s=1e-3)"
        )
    if cost_model == "default":
        return default_cost_model(model)
    if isinstance(cost_model, str | Path):
        return CostModel.load(cost_model, model)
    if not isinstance(cost_model, CostModel):
        raise ValueError(
            f"cost_model must be a cl.sim.CostModel, 'default' or a path to one, got "
            f"{type(cost_model).__name__}"
        )
    return cost_model


# -- the shipped calibration --------------------------------------------------------------

DATA_DIR = Path(__file__).parent / "data"
# Model name -> the calibration shipped for it (regenerate with `cortexlab calibrate`).
SHIPPED = {"SmolLM2-135M-Instruct": "cost_model_SmolLM2-135M-Instruct.json"}


def shipped_path(model_name: str) -> Path | None:
    """Where the calibration shipped for a model of this name lives (None: none ships)."""
    name = SHIPPED.get(model_name)
    return None if name is None else DATA_DIR / name


def default_cost_model(model: Model) -> CostModel:
    """The calibration shipped with cortexlab for `model` (the embedded SmolLM2-135M,
    unquantized): measured on a 2-core Linux CPU machine (see its ``info``), so a guide to
    this kind of machine, not to yours. ValueError for any other model, saying how to
    calibrate it."""
    path = shipped_path(model.name)
    if path is None or not path.exists():
        shipped = ", ".join(sorted(SHIPPED)) or "none"
        raise ValueError(
            f"no calibration ships for model {model.name!r} (shipped: {shipped}); fit one "
            "with cl.sim.calibrate(model) and save it (or run `cortexlab calibrate --model "
            "... --output FILE`), or estimate one with cl.sim.roofline(shape, hardware)"
        )
    return CostModel.load(path, model)


# Calibration runs the real engine; it lives in cortexlab/calibration.py (which imports the
# cost model above), re-exported here as cl.sim.calibrate and so on.
from cortexlab.calibration import (  # noqa: E402
    CALIBRATION_ENGINE,
    CALIBRATION_SCHEDULERS,
    DEFAULT_GRID,
    FIDELITY_METRICS,
    FIDELITY_PERCENTILES,
    calibrate,
    calibration_workloads,
    fidelity,
    load_factor,
    probe_seconds,
    profile_engine,
    warm_up,
)
