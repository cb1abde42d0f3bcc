"""Simulated execution: a cost model of each step's batch instead of a forward pass.

``Engine(model, clock="simulated", cost_model=...)`` swaps the `Runner` for a
`SimulatedRunner`: the scheduler, allocator, hooks and Trace run unchanged, but no forward
pass runs and nothing is written to the KV arena; each step lasts what the `CostModel`
says its batch costs, and every sampled row gets one placeholder token (never EOS), so a
workload's request (``max_tokens = output_len``, ``ignore_eos``) emits exactly its output
length. The cost model is linear in a few batch features, with named coefficients that
`calibrate` fits by least squares to the real engine's step times on this machine.
"""

from __future__ import annotations

import json
import math
import numbers
import platform
import time
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
from cortexlab.runner import ATTENTION_CHUNK, MAX_PADDING_TOKENS, RowWork, Runner, group_rows
from cortexlab.sampling import Sampler
from cortexlab.workloads import Workload

import mlx.core as mx
import numpy as np

__all__ = [
    "HARDWARE",
    "MODEL_SHAPES",
    "BatchFeatures",
    "CostModel",
    "Hardware",
    "ModelShape",
    "ShapedModel",
    "default_cost_model",
    "fidelity",
    "load_factor",
    "probe_seconds",
    "get_hardware",
    "get_shape",
    "kv_budget",
    "roofline",
    "shaped_model",
    "shipped_path",
    "NullArena",
    "SimulatedRunner",
    "SimulatedSampler",
    "batch_features",
    "calibrate",
    "CALIBRATION_ENGINE",
    "CALIBRATION_SCHEDULERS",
    "DEFAULT_GRID",
    "calibration_workloads",
    "profile_engine",
    "model_identity",
    "placeholder_token",
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


def _layout(lengths: Sequence[int]) -> tuple[int, int]:
    """(padding tokens, forward passes) of the real runner for rows of these lengths:
    rows cut into `ATTENTION_CHUNK` pieces (waves), each wave grouped by `group_rows`."""
    padding = forwards = 0
    wave = list(lengths)
    while wave:
        pieces = [min(n, ATTENTION_CHUNK) for n in wave]
        groups = group_rows(pieces, MAX_PADDING_TOKENS)
        forwards += len(groups)
        for group in groups:
            sizes = [pieces[i] for i in group]
            padding += max(sizes) * len(sizes) - sum(sizes)
        wave = [n - ATTENTION_CHUNK for n in wave if n > ATTENTION_CHUNK]
    return padding, forwards


def batch_features(rows: Sequence[RowWork]) -> BatchFeatures:
    """The features of one step's rows (as the engine hands them to a runner)."""
    lengths = [len(r.token_ids) for r in rows]
    num_decode = lengths.count(1)
    if num_decode == len(lengths):
        padding, forwards = 0, 1 if lengths else 0  # the common all-decode step: one group
    else:
        padding, forwards = _layout(lengths)
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
        return self(batch_features(rows))

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
        features = self.last_features = batch_features(rows)
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


# -- calibration ---------------------------------------------------------------------------

# Batch shapes profiled by default: each a tuple of rows (cached tokens, new tokens).
# Decodes at several batch sizes and contexts, prompts alone and together, and mixed steps.
DEFAULT_GRID: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 1),),
    ((64, 1),) * 4,
    ((256, 1),) * 4,
    ((32, 1),) * 16,
    ((256, 1),) * 16,
    ((0, 16),),
    ((0, 64),),
    ((0, 200),),
    ((0, 64), (0, 56)),
    ((0, 32),) * 4,
    ((0, 64), (0, 16)),
    ((128, 64),),
    ((64, 1),) * 8 + ((0, 48),),
    ((128, 1),) * 8 + ((0, 128),),
)


def _check_grid(grid: Any, model: Model) -> list[tuple[tuple[int, int], ...]]:
    """The grid as tuples of (cached, new) int pairs; ValueError naming a bad entry."""
    if isinstance(grid, str | bytes) or not isinstance(grid, Sequence) or not grid:
        raise ValueError(f"grid must be a non-empty list of batch shapes, got {grid!r}")
    shapes = []
    for i, shape in enumerate(grid):
        if isinstance(shape, str | bytes) or not isinstance(shape, Sequence) or not shape:
            raise ValueError(
                f"grid[{i}] must be a non-empty list of (cached, new) token counts, got {shape!r}"
            )
        rows = []
        for row in shape:
            ok = (
                isinstance(row, Sequence)
                and len(row) == 2
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in row)
            )
            if not ok or row[0] < 0 or row[1] < 1 or row[0] + row[1] > model.max_context:
                raise ValueError(
                    f"grid[{i}]: each row must be (cached, new) ints with cached >= 0, new >= 1 "
                    f"and cached + new <= {model.max_context} (the model's context), got {row!r}"
                )
            rows.append((int(row[0]), int(row[1])))
        shapes.append(tuple(rows))
    return shapes


def _shape_rows(shape: Sequence[tuple[int, int]], block_size: int, vocab: int) -> list[RowWork]:
    """Rows of one batch shape with disjoint block tables and seeded token ids."""
    rng = np.random.default_rng(0)
    rows, next_block = [], 0
    for cached, new in shape:
        n = -(-(cached + new) // block_size)
        table = list(range(next_block, next_block + n))
        next_block += n
        rows.append(RowWork(table, cached, rng.integers(0, vocab, new).tolist(), True))
    return rows


def calibration_workloads() -> list[Workload]:
    """The workloads `calibrate` runs by default: a burst of prompts, a light Poisson stream
    of short ones and a bursty stream of long ones (seeds 9001-9003, which no fidelity check
    uses), small enough to run in a few minutes on two CPU cores."""
    from cortexlab import workloads as wl

    return [
        wl.burst(12, prompt_len=wl.Uniform(32, 320), output_len=wl.Uniform(8, 40), seed=9001),
        wl.poisson(
            2.0,
            num_requests=16,
            prompt_len=wl.Uniform(8, 96),
            output_len=wl.Uniform(16, 64),
            seed=9002,
        ),
        wl.gamma(
            1.5,
            2.0,
            num_requests=12,
            prompt_len=wl.Uniform(64, 480),
            output_len=wl.Uniform(4, 32),
            seed=9003,
        ),
    ]


# The schedulers each calibration workload runs under: whole prompts and chunked ones.
CALIBRATION_SCHEDULERS = ("fcfs", "sarathi")
# Engine options of the calibration runs: vLLM's chunked-prefill token budget, so no step
# computes more than 512 tokens (the measured steps span the sizes simulated steps take).
CALIBRATION_ENGINE = {"max_num_batched_tokens": 512}


def profile_engine(
    model: Model,
    workload: Workload,
    *,
    scheduler: Any = "fcfs",
    trace: Any = None,
    **engine_kwargs: Any,
) -> tuple[list[BatchFeatures], list[float]]:
    """Run `workload` on the real engine (measured clock); each step's features and its
    measured duration, the whole step as the engine times it (scheduling, forward pass,
    sampling, bookkeeping). A `trace` (``cl.Trace()``) records the run as well."""
    from cortexlab.engine import Engine

    engine = Engine(model, scheduler=scheduler, clock="measured", **engine_kwargs)
    if not isinstance(engine.runner, Runner):
        raise ValueError("profile_engine needs the real runner (not clock='simulated')")
    features: dict[int, BatchFeatures] = {}
    durations: dict[int, float] = {}
    forward = engine.runner.forward

    def recording_forward(rows: list[RowWork]) -> mx.array:
        features[engine.num_steps] = batch_features(rows)
        return forward(rows)

    def on_end(event: Any) -> None:
        durations[event.step] = event.data["duration"]

    engine.runner.forward = recording_forward
    start = engine.clock.now()
    with engine.hooks({} if trace is None else trace.hooks), engine.hooks({"step.end": on_end}):
        for index, r in enumerate(workload.iter_materialize(model)):
            engine.submit(
                r.prompt_token_ids, r.params, request_id=index, arrival_time=start + r.arrival_time
            )
        engine.run_until_done()
    steps = sorted(step for step in features if durations.get(step, 0) > 0)
    return [features[s] for s in steps], [durations[s] for s in steps]


def _probe_workload() -> Workload:
    from cortexlab import workloads as wl

    return wl.burst(4, prompt_len=wl.Fixed(96), output_len=wl.Fixed(8), seed=0)


def probe_seconds(model: Model, **engine_kwargs: Any) -> float:
    """Seconds the real engine computes a fixed small probe (4 prompts of 96 tokens, 8
    tokens each): how fast this machine runs the model right now (`calibrate` records it
    before and after, ``info["probe_seconds"]``; `load_factor` compares it with the cost
    model)."""
    return float(sum(profile_engine(model, _probe_workload(), **engine_kwargs)[1]))


def load_factor(model: Model, cost_model: CostModel, **engine_kwargs: Any) -> float:
    """How much slower the real engine runs the `probe_seconds` probe now than `cost_model`
    predicts for the same steps (> 1: the machine is busier than while calibrating). The
    reference is the fit over every calibration step, steadier than a probe timed then."""
    features, durations = profile_engine(model, _probe_workload(), **engine_kwargs)
    predicted = sum(cost_model(f) for f in features)
    return sum(durations) / predicted if predicted > 0 else 1.0


def warm_up(model: Model, **engine_kwargs: Any) -> None:
    """A few untimed requests through the real engine: the first steps of a process pay
    for MLX's allocations and caches, which no later step does."""
    from cortexlab import workloads as wl

    warm = wl.burst(4, prompt_len=wl.Uniform(16, 64), output_len=wl.Fixed(4), seed=0)
    profile_engine(model, warm, **engine_kwargs)


def calibrate(
    model: Model,
    *,
    workloads: Sequence[Workload] | None = None,
    schedulers: Sequence[Any] = CALIBRATION_SCHEDULERS,
    grid: Sequence[Sequence[tuple[int, int]]] | None = None,
    repeats: int = 3,
    block_size: int = 16,
    **engine_kwargs: Any,
) -> CostModel:
    """Fit a CostModel to the real engine's step times on this machine.

    By default each of `workloads` (default `calibration_workloads()`) runs through the real
    engine under each of `schedulers` on the measured clock (engine options
    `CALIBRATION_ENGINE`, updated by `engine_kwargs`), and the coefficients are fitted by
    non-negative least squares to every step's measured duration (relative error, then
    scaled to the measured total: `CostModel.fit(match_total=True)`): whole steps, so the
    scheduling, sampling and bookkeeping a simulated run leaves out are priced in, at the
    load this machine has while calibrating.

    With `grid` instead (batch shapes, each a list of (cached, new) token counts per row),
    only the runner's forward pass and a greedy argmax are timed on each shape, `repeats`
    times after a warm-up, keeping the fastest: a quick sketch of the forward pass alone.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a cortexlab Model (cl.load_model()), got {model!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if grid is not None:
        if workloads is not None or engine_kwargs:
            raise ValueError("calibrate takes workloads (and engine options) or a grid, not both")
        return _calibrate_grid(model, grid=grid, repeats=repeats, block_size=block_size)
    workloads = calibration_workloads() if workloads is None else list(workloads)
    if not workloads or not all(isinstance(w, Workload) for w in workloads):
        raise ValueError(
            f"workloads must be a non-empty list of cl.workloads.Workload, got {workloads!r}"
        )
    if isinstance(schedulers, str) or not schedulers:
        raise ValueError(f"schedulers must be a non-empty list of schedulers, got {schedulers!r}")
    engine = {**CALIBRATION_ENGINE, **engine_kwargs, "block_size": block_size}
    t0 = time.perf_counter()
    warm_up(model, scheduler=schedulers[0], **engine)
    probes = [probe_seconds(model, **engine)]
    features: list[BatchFeatures] = []
    durations: list[float] = []
    for workload in workloads:
        for scheduler in schedulers:
            f, d = profile_engine(model, workload, scheduler=scheduler, **engine)
            features += f
            durations += d
    probes.append(probe_seconds(model, **engine))
    info = {
        "method": "engine",
        "workloads": [repr(w) for w in workloads],
        "schedulers": [getattr(s, "name", None) or str(s) for s in schedulers],
        "engine": {k: v for k, v in engine.items() if isinstance(v, int | float | str)},
        "num_steps": len(durations),
        # The probe before and after: how fast the machine ran while calibrating.
        "probe_seconds": sum(probes) / len(probes),
        "seconds": round(time.perf_counter() - t0, 1),
        **_machine_info(block_size),
    }
    return CostModel.fit(
        features, durations, model=model_identity(model), info=info, match_total=True
    )


def _machine_info(block_size: int) -> dict:
    return {
        "block_size": block_size,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "mlx": getattr(mx, "__version__", "unknown"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _calibrate_grid(
    model: Model, *, grid: Sequence[Sequence[tuple[int, int]]], repeats: int, block_size: int
) -> CostModel:
    """`calibrate` over batch shapes: the forward pass alone, fastest of `repeats`."""
    from cortexlab.kv.arena import KVArena

    shapes = _check_grid(grid, model)
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral):
        raise ValueError(f"repeats must be an int in [1, 1000], got {repeats!r}")
    if not 1 <= repeats <= 1000:
        raise ValueError(f"repeats must be an int in [1, 1000], got {repeats!r}")
    all_rows = [_shape_rows(s, block_size, model.vocab_size) for s in shapes]
    num_blocks = max(max(r.block_table) for rows in all_rows for r in rows) + 1
    arena = KVArena(
        num_layers=model.num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        dtype=model.dtype,
    )
    runner = Runner(model, arena)

    def timed(rows: list[RowWork]) -> float:
        t0 = time.perf_counter()
        tokens = mx.argmax(runner.forward(rows), axis=-1)
        mx.eval(tokens, *arena.arrays)
        tokens.tolist()
        return time.perf_counter() - t0

    for rows in all_rows:
        timed(rows)  # warm-up: arena growth, kernel compilation
    # Repeats go round the whole grid, so a burst of other work on a shared CPU spoils one
    # try of several shapes rather than every try of one shape; the fastest try is kept.
    durations = [math.inf] * len(all_rows)
    for _ in range(repeats):
        for i, rows in enumerate(all_rows):
            durations[i] = min(durations[i], timed(rows))
    features = [batch_features(rows) for rows in all_rows]
    info = {
        "method": "grid",
        "grid": [list(map(list, s)) for s in shapes],
        "durations": durations,
        "repeats": repeats,
        **_machine_info(block_size),
    }
    return CostModel.fit(features, durations, model=model_identity(model), info=info)


# -- fidelity ---------------------------------------------------------------------------------

FIDELITY_METRICS = ("ttft", "tpot", "e2e")
FIDELITY_PERCENTILES = ("p50", "p90")


def fidelity(
    model: Model,
    workloads: Mapping[str, Workload],
    cost_model: Any,
    *,
    schedulers: Sequence[Any] = ("fcfs", "sarathi"),
    allocator: Any = "paged",
    metrics: Sequence[str] = FIDELITY_METRICS,
    percentiles: Sequence[str] = FIDELITY_PERCENTILES,
    track_load: bool = False,
    **engine_kwargs: Any,
) -> Any:
    """Each workload under each scheduler, measured (the real engine, measured clock) and
    simulated (`cost_model`): a DataFrame with one row per (workload, scheduler, metric,
    percentile) and columns measured, simulated and error (simulated / measured - 1), and
    step_ratio: the cost model's durations of the measured run's own steps over their
    measured durations (1 when it prices each step right, whatever the scheduling did).

    `track_load=True` times the `probe_seconds` probe before and after each measured run and
    simulates that run with the cost model scaled by their mean `load_factor` (column
    load_factor; simulated_fixed and error_fixed keep the unscaled model's numbers): on a
    shared machine whose speed moves with other work, this separates the simulator's error
    from the change of load since calibration.
    """
    from cortexlab.experiment import label, run_workload
    from cortexlab.trace import Trace

    import pandas as pd

    if not isinstance(workloads, Mapping) or not workloads:
        raise ValueError(f"workloads must be a non-empty dict name -> Workload, got {workloads!r}")
    if not isinstance(track_load, bool):
        raise ValueError(f"track_load must be a bool, got {track_load!r}")
    cost_model = check_simulation("simulated", cost_model, model)
    warm_up(model, **engine_kwargs)
    rows = []
    for name, workload in workloads.items():
        for scheduler in schedulers:
            common = {"scheduler": scheduler, "allocator": allocator, **engine_kwargs}
            factor = load_factor(model, cost_model, **engine_kwargs) if track_load else 1.0
            trace = Trace()
            features, durations = profile_engine(model, workload, trace=trace, **common)
            measured = trace.summary()
            step_ratio = sum(cost_model(f) for f in features) / sum(durations)
            if track_load:
                factor = (factor + load_factor(model, cost_model, **engine_kwargs)) / 2
            fixed = run_workload(model, workload, backend="sim", cost_model=cost_model, **common)
            scaled = fixed
            if track_load:
                scaled = run_workload(
                    model, workload, backend="sim", cost_model=cost_model.scaled(factor), **common
                )
            for metric in metrics:
                for p in percentiles:
                    key = f"{metric}_{p}"
                    row = {
                        "workload": name,
                        "scheduler": label(scheduler),
                        "metric": metric,
                        "percentile": p,
                        "measured": measured[key],
                        "simulated": scaled.summary[key],
                        "error": scaled.summary[key] / measured[key] - 1,
                        "step_ratio": step_ratio,
                    }
                    if track_load:
                        row["load_factor"] = factor
                        row["simulated_fixed"] = fixed.summary[key]
                        row["error_fixed"] = fixed.summary[key] / measured[key] - 1
                    rows.append(row)
    return pd.DataFrame(rows)
