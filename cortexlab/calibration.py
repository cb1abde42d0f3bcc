"""Calibration and fidelity of the simulator's cost models (`cl.sim`).

`calibrate` fits a `CostModel` to the real engine's measured steps on calibration
workloads (or times the forward pass alone on a grid of batch shapes); `fidelity` compares
simulated and measured latencies of the same workloads; `probe_seconds` and `load_factor`
tell how busy the machine is compared with a cost model. Everything here runs the real
model; `cortexlab/sim.py` re-exports it as ``cl.sim.*``.
"""

from __future__ import annotations

import math
import numbers
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cortexlab.models.base import Model
from cortexlab.runner import RowWork, Runner
from cortexlab.sim import (
    BatchFeatures,
    CostModel,
    batch_features,
    check_simulation,
    model_identity,
)
from cortexlab.workloads import Workload

import mlx.core as mx
import numpy as np

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
        features[engine.num_steps] = batch_features(rows, engine.runner.attention_chunk)
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
    workloads, schedulers = _check_calibration(workloads, schedulers)
    engine = {**CALIBRATION_ENGINE, **engine_kwargs, "block_size": block_size}
    t0 = time.perf_counter()
    warm_up(model, scheduler=schedulers[0], **engine)
    probes = [probe_seconds(model, **engine)]
    features: list[BatchFeatures] = []
    durations: list[float] = []
    for scheduler in schedulers:
        f, d = _calibration_steps(model, workloads, scheduler, engine)
        features += f
        durations += d
    probes.append(probe_seconds(model, **engine))
    return _fit_engine_steps(
        model, features, durations, workloads, schedulers, engine, t0, probe=probes
    )


def _check_calibration(workloads: Any, schedulers: Any) -> tuple[list[Workload], list[Any]]:
    workloads = calibration_workloads() if workloads is None else list(workloads)
    if not workloads or not all(isinstance(w, Workload) for w in workloads):
        raise ValueError(
            f"workloads must be a non-empty list of cl.workloads.Workload, got {workloads!r}"
        )
    if isinstance(schedulers, str) or not schedulers:
        raise ValueError(f"schedulers must be a non-empty list of schedulers, got {schedulers!r}")
    return workloads, list(schedulers)


def _calibration_steps(
    model: Model, workloads: Sequence[Workload], scheduler: Any, engine: Mapping
) -> tuple[list[BatchFeatures], list[float]]:
    """Every calibration workload through the real engine under `scheduler`: its steps."""
    from cortexlab.experiment import _fresh

    features: list[BatchFeatures] = []
    durations: list[float] = []
    for workload in workloads:
        f, d = profile_engine(model, workload, scheduler=_fresh(scheduler), **engine)
        features += f
        durations += d
    return features, durations


def _fit_engine_steps(
    model: Model,
    features: list[BatchFeatures],
    durations: list[float],
    workloads: Sequence[Workload],
    schedulers: Sequence[Any],
    engine: Mapping,
    t0: float,
    probe: Sequence[float] = (),
    **extra: Any,
) -> CostModel:
    """The CostModel fitted to measured engine steps, with `info` saying how it was made."""
    info = {
        "method": "engine",
        "workloads": [repr(w) for w in workloads],
        "schedulers": [getattr(s, "name", None) or str(s) for s in schedulers],
        "engine": {k: v for k, v in engine.items() if isinstance(v, int | float | str)},
        "num_steps": len(durations),
        # The runner's prompt pieces: simulated steps count forwards and padding the same way.
        "attention_chunk": Runner(
            model, None, fast_activation=engine.get("fast_activation", True)
        ).attention_chunk,
        **extra,
        "seconds": round(time.perf_counter() - t0, 1),
        **_machine_info(engine.get("block_size", 16)),
    }
    if probe:  # the probe before and after: how fast the machine ran while calibrating
        info["probe_seconds"] = sum(probe) / len(probe)
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
    features = [batch_features(rows, runner.attention_chunk) for rows in all_rows]
    info = {
        "method": "grid",
        "grid": [list(map(list, s)) for s in shapes],
        "attention_chunk": runner.attention_chunk,
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
    repeats: int = 1,
    track_load: bool = False,
    calibrate_on: Sequence[Workload] | None = None,
    **engine_kwargs: Any,
) -> Any:
    """Each workload under each scheduler, measured (the real engine, measured clock) and
    simulated (`cost_model`): a DataFrame with one row per (workload, scheduler, metric,
    percentile) and columns measured, simulated and error (simulated / measured - 1), and
    step_ratio: the cost model's durations of the measured run's own steps over their
    measured durations (1 when it prices each step right, whatever the scheduling did).

    `repeats` > 1 measures each configuration that many times, round-robin over the
    configurations (so a slow spell of a shared machine spreads over all of them):
    measured is then the mean of the runs, measured_min and measured_max their range
    (the machine's own run-to-run spread, which no simulator can be closer than) and
    step_ratio the mean of the runs'. The simulation is deterministic and runs once.

    ``cost_model="calibrate"`` fits the cost model in this call, interleaved with the
    measurements: each round (of `repeats`) first runs the calibration workloads
    (`calibrate_on`, default `calibration_workloads()`; never the ones checked) under one of
    `CALIBRATION_SCHEDULERS`
    in turn, then measures every configuration once; the fit uses every round's calibration
    steps, so it saw the same spells of machine load as the measured runs
    (``attrs["cost_model"]`` holds it). Otherwise `cost_model` is a CostModel, "default" or
    a path, fitted before.

    `track_load=True` times the `probe_seconds` probe before and after each measured run and
    simulates that run with the cost model scaled by their mean `load_factor` (column
    load_factor; simulated_fixed and error_fixed keep the unscaled model's numbers): on a
    shared machine whose speed moves with other work, this separates the simulator's error
    from the change of load since calibration.

    ``attrs["traces"]`` holds each (workload, scheduler)'s two Traces, ``{"measured": ...,
    "simulated": ...}`` (the first measured run; the unscaled simulation), for per-request
    comparisons and plots; ``attrs["measured_runs"]`` each one's list of measured Traces.
    """
    from cortexlab.experiment import _fresh, label, run_workload
    from cortexlab.trace import Trace

    import pandas as pd

    if not isinstance(workloads, Mapping) or not workloads:
        raise ValueError(f"workloads must be a non-empty dict name -> Workload, got {workloads!r}")
    if not isinstance(track_load, bool):
        raise ValueError(f"track_load must be a bool, got {track_load!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    calibrating = isinstance(cost_model, str) and cost_model == "calibrate"
    if calibrate_on is not None and not calibrating:
        raise ValueError("calibrate_on is only used with cost_model='calibrate'")
    if calibrating:
        calibrate_on, _ = _check_calibration(calibrate_on, CALIBRATION_SCHEDULERS)
    if calibrating and track_load:
        raise ValueError("track_load needs a cost model fitted before; not cost_model='calibrate'")
    if not calibrating:
        cost_model = check_simulation("simulated", cost_model, model)
    t0 = time.perf_counter()
    warm_up(model, **engine_kwargs)
    calibration_engine = {"block_size": 16, **CALIBRATION_ENGINE, **engine_kwargs}
    calibration: tuple[list[BatchFeatures], list[float]] = ([], [])
    configs = [(name, s) for name in workloads for s in schedulers]
    runs: dict[int, list[tuple[Trace, list, list, float]]] = {i: [] for i in range(len(configs))}
    for round_ in range(int(repeats)):
        if calibrating:
            scheduler = CALIBRATION_SCHEDULERS[round_ % len(CALIBRATION_SCHEDULERS)]
            f, d = _calibration_steps(model, calibrate_on, scheduler, calibration_engine)
            calibration[0].extend(f)
            calibration[1].extend(d)
        for i, (name, scheduler) in enumerate(configs):
            common = {"scheduler": scheduler, "allocator": allocator, **engine_kwargs}
            factor = load_factor(model, cost_model, **engine_kwargs) if track_load else 1.0
            trace = Trace()
            # Fresh copies of policy objects, as run_workload makes for the simulated run.
            fresh = {**common, "scheduler": _fresh(scheduler), "allocator": _fresh(allocator)}
            features, durations = profile_engine(model, workloads[name], trace=trace, **fresh)
            if track_load:
                factor = (factor + load_factor(model, cost_model, **engine_kwargs)) / 2
            runs[i].append((trace, features, durations, factor))
    if calibrating:
        used = CALIBRATION_SCHEDULERS[: min(int(repeats), len(CALIBRATION_SCHEDULERS))]
        cost_model = _fit_engine_steps(
            model,
            *calibration,
            calibrate_on,
            used,
            calibration_engine,
            t0,
            interleaved_rounds=int(repeats),
        )
    rows, traces, measured_runs = [], {}, {}
    for i, (name, scheduler) in enumerate(configs):
        common = {"scheduler": scheduler, "allocator": allocator, **engine_kwargs}
        measured = [trace.summary() for trace, _, _, _ in runs[i]]
        step_ratio = float(np.mean([sum(map(cost_model, f)) / sum(d) for _, f, d, _ in runs[i]]))
        factor = float(np.mean([x for _, _, _, x in runs[i]]))
        fixed = run_workload(model, workloads[name], backend="sim", cost_model=cost_model, **common)
        traces[name, label(scheduler)] = {"measured": runs[i][0][0], "simulated": fixed.trace}
        measured_runs[name, label(scheduler)] = [trace for trace, _, _, _ in runs[i]]
        scaled = fixed
        if track_load:
            scaled = run_workload(
                model,
                workloads[name],
                backend="sim",
                cost_model=cost_model.scaled(factor),
                **common,
            )
        for metric in metrics:
            for p in percentiles:
                key = f"{metric}_{p}"
                values = [m[key] for m in measured]
                mean = float(np.mean(values))
                row = {
                    "workload": name,
                    "scheduler": label(scheduler),
                    "metric": metric,
                    "percentile": p,
                    "measured": mean,
                    "simulated": scaled.summary[key],
                    "error": scaled.summary[key] / mean - 1,
                    "step_ratio": step_ratio,
                }
                if repeats > 1:
                    row["measured_min"] = min(values)
                    row["measured_max"] = max(values)
                if track_load:
                    row["load_factor"] = factor
                    row["simulated_fixed"] = fixed.summary[key]
                    row["error_fixed"] = fixed.summary[key] / mean - 1
                rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["traces"] = traces
    frame.attrs["measured_runs"] = measured_runs
    frame.attrs["cost_model"] = cost_model
    return frame
