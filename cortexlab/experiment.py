"""Experiments: run a workload through an engine, compare policies, sweep configurations.

Every run builds a fresh engine with the same settings (and fresh copies of policy
objects), feeds it the workload's requests at their arrival times (``clock="measured"`` by
default: idle gaps are jumped, compute is timed), records a Trace and summarises it with
`cortexlab.metrics`. Sweeps cache each
configuration's summary on disk by a hash of everything that determines it, so re-running
a notebook does not recompute.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cortexlab import executors
from cortexlab.engine import Engine
from cortexlab.guard import EngineError, policy_name
from cortexlab.metrics import check_slo
from cortexlab.models.base import Model
from cortexlab.trace import Trace
from cortexlab.trace_summary import SummaryTrace
from cortexlab.workloads import Workload

import mlx.core as mx
import numpy as np
import pandas as pd
from mlx.utils import tree_flatten
from tqdm.auto import tqdm

# The columns a comparison shows first; every other summary column follows.
SUMMARY_COLUMNS = (
    "num_finished",
    "num_failed",
    "ttft_p50",
    "ttft_p99",
    "tpot_p50",
    "tpot_p99",
    "e2e_mean",
    "e2e_p99",
    "normalized_latency_mean",
    "queue_delay_mean",
    "goodput_share",
    "throughput_rps",
    "output_tps",
    "num_preemptions",
    "service_gap",
    "ttft_steps_mean",
    "e2e_steps_mean",
)


@dataclass
class Run:
    """One workload through one engine configuration: its trace and summary."""

    name: str
    config: dict
    trace: Trace | SummaryTrace
    summary: dict
    wall_seconds: float
    error: str | None = None

    def _repr_html_(self) -> str:
        table = pd.DataFrame([self.summary], index=[self.name])
        shown = [c for c in SUMMARY_COLUMNS if c in table]
        return f"<b>{self.name}</b>" + table[shown].to_html(float_format=lambda v: f"{v:.4g}")


def label(policy: Any) -> str:
    """A short display name for a policy given as a name, class, object or function."""
    if isinstance(policy, str):
        return policy
    if isinstance(policy, type):
        return getattr(policy, "name", None) or policy.__qualname__
    if inspect.isfunction(policy) or inspect.ismethod(policy):
        return policy.__name__  # not "function": two function policies must differ
    name = getattr(policy, "name", None)
    return name if isinstance(name, str) and name != "base" else policy_name(policy)


def _fresh(policy: Any) -> Any:
    """A copy of a policy object, so every run starts from the state it was given in (a
    scheduler keeps counters, queues and predictions across steps) and the caller's object
    is left as it was; names, classes and plain functions are used as they are."""
    if isinstance(policy, str | type) or inspect.isfunction(policy):
        return policy
    try:
        return copy.deepcopy(policy)
    except Exception as exc:  # e.g. a policy holding a lock or an open file
        warnings.warn(
            f"could not copy {label(policy)} ({exc!r}); runs share its state", stacklevel=3
        )
        return policy


BACKENDS = ("engine", "sim")
# run_workload streams a workload with more requests than this (Engine.feed) by default.
STREAM_ABOVE = 1000


def _backend_clock(backend: str, clock: str | None) -> str:
    """The engine clock a backend runs on: "sim" is the simulated clock (a cost model's step
    times, no forward pass), "engine" the real forward pass on `clock` (default measured)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "sim":
        if clock not in (None, "simulated"):
            raise ValueError(f"backend='sim' runs on the simulated clock; got clock={clock!r}")
        return "simulated"
    return "measured" if clock is None else clock


def run_workload(
    model: Model,
    workload: Workload,
    *,
    scheduler: Any = "fcfs",
    allocator: Any = "paged",
    clock: str | None = None,
    backend: str = "engine",
    slo: Mapping[str, float] | None = None,
    name: str | None = None,
    blocks: bool = False,
    trace: str = "full",
    stream: bool | None = None,
    **engine_kwargs: Any,
) -> Run:
    """Run every request of `workload` at its arrival time on a fresh engine; summarise it.

    `blocks=True` records which block each request holds at every step (`Trace(blocks=True)`).
    `trace="summary"` records a `SummaryTrace` instead of a full `Trace`: the same summary
    (percentiles within its stated error above 10,000 values) in memory that does not grow
    with the number of requests. `stream=True` hands the requests to the engine as the clock
    reaches them (`Engine.feed`) instead of submitting them all first, so they never all
    exist at once; the run is the same. By default a workload over
    `STREAM_ABOVE` requests streams.
    `backend="sim"` runs the same policies on the simulated clock, pricing each step with
    `cost_model` (pass it among the engine options; see ``cortexlab/sim.py``); the default
    "engine" runs the model on `clock` (default "measured").

    A scheduler or allocator given as an object runs as a copy: every run starts from the
    object as given, which stays unchanged (so a sweep's runs do not share its state).
    """
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a cl.workloads.Workload, got {type(workload).__name__}")
    slo = check_slo(slo)
    clock = _backend_clock(backend, clock)
    engine = Engine(
        model,
        scheduler=_fresh(scheduler),
        allocator=_fresh(allocator),
        clock=clock,
        **engine_kwargs,
    )
    recorder: Trace | SummaryTrace
    if trace == "full":
        recorder = Trace(blocks=blocks)
    elif trace == "summary":
        if blocks:
            raise ValueError("blocks=True needs trace='full' (a summary keeps no block tables)")
        recorder = SummaryTrace(slo=slo)
    else:
        raise ValueError(f"trace must be 'full' or 'summary', got {trace!r}")
    if stream is None:
        stream = len(workload) > STREAM_ABOVE
    error = None
    requests = workload.iter_materialize(model)
    t0 = time.perf_counter()
    with engine.hooks(recorder.hooks):
        start = engine.clock.now()
        if stream:
            engine.feed(
                (start + r.arrival_time, r.prompt_token_ids, r.params, index)
                for index, r in enumerate(requests)
            )
        else:
            for index, r in enumerate(requests):
                engine.submit(
                    r.prompt_token_ids,
                    r.params,
                    request_id=index,
                    arrival_time=start + r.arrival_time,
                )
        try:
            engine.run_until_done()
        except EngineError as exc:  # the failed requests carry it; the summary counts them
            error = f"{type(exc).__name__}: {exc}"
    config = {"scheduler": label(scheduler), "allocator": label(allocator), "clock": clock}
    config |= {"backend": backend} if backend != "engine" else {}
    return Run(
        name=name or label(scheduler),
        config=config | engine_kwargs,
        trace=recorder,
        summary=recorder.summary(slo),
        wall_seconds=time.perf_counter() - t0,
        error=error,
    )


@dataclass
class Comparison:
    """Runs of one workload under several policies, indexed by policy name."""

    runs: dict[str, Run]
    slo: dict = field(default_factory=dict)

    @property
    def summary(self) -> pd.DataFrame:
        """One row per policy: latency percentiles, goodput, throughput, preemptions."""
        table = pd.DataFrame({name: run.summary for name, run in self.runs.items()}).T
        first = [c for c in SUMMARY_COLUMNS if c in table]
        table = table[first + [c for c in table if c not in first]]
        table.index.name = "policy"
        return table

    def __getitem__(self, name: str) -> Run:
        return self.runs[name]

    def __or__(self, other: Comparison) -> Comparison:
        """Both comparisons' runs (e.g. built-ins | a policy compared later); names must differ."""
        clash = set(self.runs) & set(other.runs)
        if clash:
            raise ValueError(f"both comparisons have runs named {sorted(clash)}")
        return Comparison({**self.runs, **other.runs}, self.slo or other.slo)

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def traces(self) -> dict[str, Trace]:
        """Policy name -> its Trace."""
        return {name: run.trace for name, run in self.runs.items()}

    def plot_latency_cdf(self, metric: str = "ttft", *, ax=None):
        """Empirical CDF of `metric` per policy."""
        from cortexlab import viz

        return viz.plot_latency_cdf(self.traces, metric=metric, ax=ax)

    def plot_metrics(self, metrics: Sequence[str] = ("ttft_p50", "ttft_p99"), *, ax=None):
        """Grouped bars of summary columns per policy."""
        from cortexlab import viz

        return viz.plot_metric_bars(self.summary, metrics=tuple(metrics), ax=ax)

    def _repr_html_(self) -> str:
        shown = self.summary[[c for c in SUMMARY_COLUMNS if c in self.summary]]
        return shown.to_html(float_format=lambda v: f"{v:.4g}")


def _run_each(
    model: Model,
    workload: Workload,
    kind: str,
    policies: Sequence[Any] | Mapping[str, Any],
    *,
    desc: str,
    progress: bool,
    **run_kwargs: Any,
) -> Comparison:
    """One `run_workload` per policy, passed as `kind` ("scheduler" or "allocator")."""
    if isinstance(policies, Mapping):
        names, policies = [str(n) for n in policies], list(policies.values())
    else:
        names = [label(p) for p in policies]
    if len(set(names)) != len(names):
        raise ValueError(
            f"{kind}s must have distinct names, got {names}; pass a dict "
            f"{{name: {kind}}} to name them"
        )
    runs = {}
    for name, policy in tqdm(
        list(zip(names, policies, strict=True)), desc=desc, disable=not progress or None
    ):
        runs[name] = run_workload(model, workload, name=name, **{kind: policy}, **run_kwargs)
    return Comparison(runs, check_slo(run_kwargs.get("slo")))


def compare(
    model: Model,
    workload: Workload,
    schedulers: Sequence[Any] | Mapping[str, Any] = ("fcfs", "sjf", "mlfq", "sarathi"),
    *,
    allocator: Any = "paged",
    slo: Mapping[str, float] | None = None,
    clock: str | None = None,
    backend: str = "engine",
    progress: bool = True,
    **engine_kwargs: Any,
) -> Comparison:
    """Run `workload` once per scheduler (same model, allocator, limits) and compare them.

    `schedulers` is a list (each named by `label`) or a dict name -> scheduler.
    `backend="sim"` (with ``cost_model=...``) simulates each run instead (`run_workload`).
    """
    _backend_clock(backend, clock)  # a bad backend fails before the first run
    return _run_each(
        model,
        workload,
        "scheduler",
        schedulers,
        desc="compare",
        progress=progress,
        allocator=allocator,
        slo=slo,
        clock=clock,
        backend=backend,
        **engine_kwargs,
    )


def compare_allocators(
    model: Model,
    workload: Workload,
    allocators: Sequence[Any] | Mapping[str, Any] = ("contiguous", "buddy", "paged", "prefix"),
    *,
    scheduler: Any = "fcfs",
    slo: Mapping[str, float] | None = None,
    clock: str | None = None,
    backend: str = "engine",
    blocks: bool = False,
    progress: bool = True,
    **engine_kwargs: Any,
) -> Comparison:
    """Run `workload` once per KV allocator (same model, scheduler, arena and limits).

    `allocators` is a list (each named by `label`) or a dict name -> allocator; pass
    `num_blocks`/`block_size` so every allocator gets the same arena. `blocks=True` keeps
    each run's block tables for `cl.viz.plot_block_map`. `backend="sim"` as in `compare`.
    """
    _backend_clock(backend, clock)
    return _run_each(
        model,
        workload,
        "allocator",
        allocators,
        desc="allocators",
        progress=progress,
        scheduler=scheduler,
        slo=slo,
        clock=clock,
        backend=backend,
        blocks=blocks,
        **engine_kwargs,
    )


# Deep enough for a policy holding a predictor holding its parameters; cycles stop here.
MAX_FINGERPRINT_DEPTH = 6


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text if isinstance(text, bytes) else text.encode()).hexdigest()


def _source(value: Any) -> str:
    try:
        return _digest(inspect.getsource(value))
    except (OSError, TypeError):
        code = getattr(value, "__code__", None)  # a function typed into a console
        return _digest(code.co_code if code is not None else getattr(value, "__qualname__", ""))


def _model_fingerprint(model: Model) -> dict:
    """Name, dtype and a sample of every weight tensor: two tiny-random seeds differ."""
    digest = hashlib.sha256()
    for name, weight in tree_flatten(model.module.parameters()):
        # 64 entries spread over the tensor: cheap for any model size.
        sample = weight.reshape(-1)[:: max(1, weight.size // 64)][:64].astype(mx.float32)
        digest.update(f"{name}{weight.shape}{weight.dtype}".encode())
        digest.update(np.array(sample).tobytes())
    return {
        "model": model.name,
        "source": model.source,
        "dtype": str(model.dtype),
        "params": model.num_parameters,
        "weights": digest.hexdigest(),
    }


def _fingerprint(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a config value that changes whenever its behaviour can
    (and, for the same value, stays the same from session to session: no memory address)."""
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    if depth > MAX_FINGERPRINT_DEPTH:
        return type(value).__qualname__
    deeper = functools.partial(_fingerprint, depth=depth + 1)
    if isinstance(value, Mapping):
        return {str(k): deeper(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [deeper(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((deeper(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, Workload):
        frame = value.to_frame().to_csv(index=False)
        return {
            "workload": _digest(frame),
            "seed": value.seed,
            "system_prompt_len": value.system_prompt_len,
        }
    if isinstance(value, Model):
        return _model_fingerprint(value)
    if isinstance(value, functools.partial):
        return {
            "partial": deeper(value.func),
            "args": deeper(value.args),
            "kw": deeper(value.keywords),
        }
    if inspect.ismethod(value):
        return {"method": deeper(value.__func__), "self": deeper(value.__self__)}
    if inspect.isfunction(value):
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(deeper(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append(None)
        return {
            "code": _source(value),
            "defaults": deeper(value.__defaults__),
            "kwdefaults": deeper(value.__kwdefaults__),
            "closure": cells,
        }
    if isinstance(value, type):
        return {"class": _source(value)}
    if hasattr(value, "bit_generator"):  # a numpy Generator: its state, not its address
        return {"rng": deeper(value.bit_generator.state)}
    if isinstance(value, mx.array):
        value = np.array(value.astype(mx.float32) if value.dtype == mx.bfloat16 else value)
    if isinstance(value, np.ndarray | np.generic):
        return {"array": _digest(value.tobytes()), "shape": value.shape, "dtype": str(value.dtype)}
    state = dict(getattr(value, "__dict__", {}))
    for cls in type(value).__mro__:  # slots classes (dataclass(slots=True)) keep state here
        for name in getattr(cls, "__slots__", ()):
            if hasattr(value, name) and name not in ("__dict__", "__weakref__"):
                state[name] = getattr(value, name)
    if not state and type(value).__module__ == "builtins":
        return repr(value)  # e.g. itertools.count(0): its repr is its state
    return {"code": _source(type(value)), "state": deeper(state)}


@functools.cache
def _package_digest() -> str:
    # Any change to cortexlab's code may change a result, so it is part of every key.
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable hash of a sweep configuration (model, workload, policies, limits, code)."""
    text = json.dumps(_fingerprint(dict(config) | {"code": _package_digest()}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sweep(
    model: Model,
    workload: Workload | Callable[..., Workload],
    *,
    schedulers: Sequence[Any] = ("fcfs",),
    rates: Sequence[float | None] = (None,),
    allocators: Sequence[Any] = ("paged",),
    seeds: Sequence[int] = (0,),
    slo: Mapping[str, float] | None = None,
    cache_dir: str | Path | None = "results/.cache",
    progress: bool = True,
    executor: Any = "auto",
    max_workers: int | None = None,
    **engine_kwargs: Any,
) -> pd.DataFrame:
    """One row per scheduler x rate x allocator x seed with its summary; cached on disk.

    `workload` is a Workload (rates rescale its arrivals with `with_rate`; only seed 0, its
    own) or a function ``f(rate=..., seed=...) -> Workload`` (called here, in this process).

    Each configuration's summary is cached in `cache_dir` under `config_hash` of everything
    that determines it; cached configurations are not run again, so an interrupted sweep
    resumes, with any executor: all of them read and write the same keys (workers return
    summaries, this process writes the files, so Ray nodes need no shared disk).

    `executor` says where the missing configurations run (see `cortexlab.executors`):
    "serial" (here, one after another), "process" (a pool of spawned local processes),
    "ray" (Ray tasks: an initialised Ray as it is, else ``ray.init()``; needs
    ``pip install 'cortexlab[ray]'``), or a `concurrent.futures.Executor`. The default,
    "auto", runs measured-clock sweeps (backend="engine") here: concurrent runs on shared
    cores would corrupt each other's timings. A backend="sim" sweep moves to processes
    only when its first configuration shows that the rest would take more than
    `cortexlab.executors.AUTO_MIN_SERIAL_SECONDS` here and there are 2+ CPUs; otherwise it
    stays here, so small sweeps do not pay the workers' start-up. `max_workers` caps the
    configurations running at once: default every CPU for backend="sim" (all of Ray's for
    "ray") and 1 for measured clocks (more warns, for the reason above).

    Rows, their order and columns are the same whatever the executor; a simulated sweep's
    values are equal too (it is deterministic), a measured one's differ as timings do.
    Workers rebuild the model from its source and check its weights; a model they cannot
    rebuild (one made in a notebook cell) needs executor="serial". A configuration that
    raises stops the sweep: no new one starts, those running finish and are cached, and
    the exception (its own type) is raised with a note naming the configuration. Runs in
    which requests fail (an `EngineError`) are results, as in `run_workload`: their
    summary counts the failures.
    """
    slo = check_slo(slo)
    executors.check(executor, max_workers)
    if isinstance(workload, Workload) and tuple(seeds) != (0,):
        raise ValueError(
            f"sweep: seeds={list(seeds)} needs `workload` given as a function "
            f"f(rate=..., seed=...) -> Workload; a Workload carries its own seed "
            f"({workload.seed})"
        )
    cache = Path(cache_dir) if cache_dir is not None else None
    grid = list(itertools.product(schedulers, rates, allocators, seeds))
    rows: list[dict] = []
    summaries: list[dict[str, float] | None] = []
    jobs: list[executors.Job] = []
    spec = functools.cache(lambda: executors.model_spec(model))  # once, only if it travels
    for index, (scheduler, rate, allocator, seed) in enumerate(grid):
        if isinstance(workload, Workload):
            wl = workload if rate is None else workload.with_rate(rate)
        else:
            wl = workload(rate=rate, seed=seed)
        config = {
            "model": model,
            "workload": wl,
            "scheduler": scheduler,
            "allocator": allocator,
            "slo": slo,
            **engine_kwargs,
        }
        key = config_hash(config)
        row = {
            "scheduler": label(scheduler),
            "rate": rate if rate is not None else wl.rate,
            "allocator": label(allocator),
            "seed": wl.seed if isinstance(workload, Workload) else seed,
            "config": key,
        }
        rows.append(row)
        summaries.append(_read_summary(cache / f"{key}.json") if cache is not None else None)
        if summaries[-1] is None:
            kwargs = dict(scheduler=scheduler, allocator=allocator, slo=slo, **engine_kwargs)
            jobs.append(
                executors.Job(
                    index=index,
                    describe=", ".join(f"{k}={v!r}" for k, v in row.items()),
                    # run_workload looked up at call time (tests replace it).
                    run_here=functools.partial(_run_summary, model, wl, kwargs),
                    task=functools.partial(_task, spec, wl, kwargs, scheduler, allocator),
                )
            )
    bar = tqdm(total=len(grid), desc="sweep", disable=not progress or None)
    bar.update(len(grid) - len(jobs))

    def done(job: executors.Job, summary: dict[str, float]) -> None:
        summaries[job.index] = summary
        if cache is not None:
            _write_summary(cache / f"{rows[job.index]['config']}.json", summary)
        bar.update(1)

    try:
        executors.run_jobs(
            jobs,
            done,
            executor=executor,
            max_workers=max_workers,
            is_measured=not (
                engine_kwargs.get("backend") == "sim" or engine_kwargs.get("clock") == "simulated"
            ),
        )
    finally:
        bar.close()
    return pd.DataFrame([row | summary for row, summary in zip(rows, summaries, strict=True)])


def _run_summary(model: Model, wl: Workload, kwargs: dict) -> dict[str, float]:
    return executors.summarize(run_workload(model, wl, **kwargs))


def _task(
    spec: Callable[[], executors.ModelSpec | executors.ShapeSpec],
    wl: Workload,
    kwargs: dict,
    scheduler: Any,
    allocator: Any,
) -> executors.Task:
    kwargs = dict(kwargs)
    return executors.Task(
        model=spec(),
        workload=wl,
        scheduler=kwargs.pop("scheduler"),
        allocator=kwargs.pop("allocator"),
        slo=kwargs.pop("slo"),
        engine_kwargs=kwargs,
        registered=executors.registered_elsewhere(scheduler, allocator),
    )


def _write_summary(path: Path, summary: Mapping[str, float]) -> None:
    """Standard JSON (NaN as null, infinities as strings), keys in summary order so cached
    and fresh rows have the same columns; written whole or not at all."""
    values = {
        k: None if math.isnan(v) else v if math.isfinite(v) else str(v) for k, v in summary.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(values, allow_nan=False))
    os.replace(partial, path)


def _read_summary(path: Path) -> dict[str, float] | None:
    """A cached summary, or None when there is none or it cannot be read (then recompute)."""
    try:
        data = json.loads(path.read_text())
        return {str(k): float("nan") if v is None else float(v) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None
