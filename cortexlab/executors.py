"""Where a sweep's configurations run: here, in local processes, or on a Ray cluster.

`cl.sweep(..., executor=...)` hands each configuration that its cache lacks to one of:

- ``"serial"``: this process, one after another, with the caller's model object.
- ``"process"``: a local pool of ``spawn``-ed processes (never ``fork``: forking a process
  whose MLX has already started threads is unsafe, and spawn behaves the same on Linux and
  macOS). A worker pays the imports once (a few seconds: mlx, mlx-lm, pandas) and then
  runs configuration after configuration.
- ``"ray"``: Ray tasks (the optional extra ``cortexlab[ray]``). Ray is used as the process
  finds it: already initialised (``ray.init(...)`` called by you, any address or options),
  else ``ray.init()`` with its own conventions (``RAY_ADDRESS``, else a new local instance,
  left running for the next sweep). `RayExecutor(address=..., **init_options)` names an
  address explicitly.
- any object with ``submit(fn, *args) -> concurrent.futures.Future`` (a
  `concurrent.futures.Executor`, e.g. a pool you keep warm across sweeps); sweep neither
  configures nor shuts it down.
- ``"auto"`` (the default): measured-clock sweeps here (runs side by side would corrupt
  each other's timings); a ``backend="sim"`` sweep in processes once its first
  configuration shows the rest would take more than `AUTO_MIN_SERIAL_SECONDS` here.

Workers never receive the model object (MLX modules do not pickle, and shipping weights
would cost more than loading them): they get a `ModelSpec` (its source, quantisation,
dtype and weight fingerprint), rebuild the model once per worker process and check that
the rebuilt weights have the caller's fingerprint. A weightless `cl.sim.shaped_model`
travels as a `ShapeSpec` (its shape, context and pickled tokenizer). A model that cannot be rebuilt that
way (made in a notebook cell, weights edited after loading, a tiny-random seed other
than 0) is an error that says to use ``executor="serial"``.

The rest of a configuration (workload, policies as names, classes, objects or functions,
cost model, engine options) travels pickled, with cloudpickle so that classes and
functions written in a notebook cell go too; names registered in a cell travel with the
factory they name. Workers return summaries and the driver writes the cache, so Ray
workers on machines that do not share the driver's disk still fill it.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import pickle
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cortexlab.models import load_model
from cortexlab.models.base import Model
from cortexlab.models.tiny import tiny_random

import mlx.core as mx
from mlx.utils import tree_flatten

EXECUTORS = ("auto", "serial", "process", "ray")
RAY_MISSING = "executor='ray' needs Ray: pip install 'cortexlab[ray]'"
# "auto" moves the rest of a sim sweep to processes only when running it here would take
# longer than this: a spawned worker's imports take 2-5 s on a busy two-core machine, so
# below about twice that, processes make a sweep slower, not faster; on a machine that
# other jobs keep busy the break-even moves up, hence the margin.
AUTO_MIN_SERIAL_SECONDS = 30.0
UNGUARDED = (
    "spawned workers import the __main__ script, so a script must start a sweep with "
    'processes under `if __name__ == "__main__":`'
)


class ModelRebuildError(RuntimeError):
    """A worker cannot rebuild the sweep's model from its source (run with executor='serial')."""


def num_cpus() -> int:
    """CPUs this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# -- the model a worker rebuilds ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What a worker needs to load the caller's model again, and the weights to expect."""

    source: str
    quantized: bool
    dtype: str
    fingerprint: str  # experiment._model_fingerprint as sorted JSON


@dataclass(frozen=True, slots=True)
class ShapeSpec:
    """What a worker needs to make the caller's weightless model (`cl.sim.shaped_model`)
    again: its shape, context and tokenizer (pickled: it is the part that is not a shape)."""

    shape: tuple  # sorted (field, value) pairs of ModelShape.to_dict()
    max_context: int
    tokenizer: bytes
    fingerprint: str


def _fingerprint_text(model: Model) -> str:
    from cortexlab.experiment import _model_fingerprint  # experiment imports this module

    return json.dumps(_model_fingerprint(model), sort_keys=True)


def model_spec(model: Model) -> ModelSpec | ShapeSpec:
    """The spec that rebuilds `model`; a tiny-random or shaped model is checked here (it is
    cheap), a file or folder by the worker that loads it."""
    from cortexlab.roofline import ShapedModel

    if isinstance(model, ShapedModel):
        try:
            tokenizer = pickle.dumps(model.tokenizer)
        except Exception as exc:
            raise ModelRebuildError(
                f"workers cannot rebuild model {model.name!r}: its tokenizer does not pickle "
                f"({type(exc).__name__}: {exc}); run the sweep with executor='serial'"
            ) from exc
        shape_spec = ShapeSpec(
            shape=tuple(sorted(model.shape.to_dict().items())),
            max_context=model.max_context,
            tokenizer=tokenizer,
            fingerprint=_fingerprint_text(model),
        )
        rebuild_model(shape_spec)
        return shape_spec
    quantized = any(name.endswith(".scales") for name, _ in tree_flatten(model.module.parameters()))
    spec = ModelSpec(
        source=str(model.source),
        quantized=quantized,
        dtype=str(model.dtype).removeprefix("mlx.core."),
        fingerprint=_fingerprint_text(model),
    )
    if spec.source == "tiny-random":
        rebuild_model(spec)
    elif not spec.source or not Path(spec.source).exists():
        raise ModelRebuildError(
            f"workers cannot rebuild model {model.name!r}: its source {spec.source!r} is not "
            "'tiny-random', a .gguf file or a model folder; run the sweep with "
            "executor='serial'"
        )
    return spec


_models: dict[ModelSpec | ShapeSpec, Model] = {}  # one per worker process and spec


def rebuild_model(spec: ModelSpec | ShapeSpec) -> Model:
    """The model `spec` describes, loaded once per process and checked against its weights."""
    if spec in _models:
        return _models[spec]
    if isinstance(spec, ShapeSpec):
        from cortexlab.roofline import ModelShape, shaped_model

        model = shaped_model(
            ModelShape(**dict(spec.shape)),
            tokenizer=pickle.loads(spec.tokenizer),
            max_context=spec.max_context,
        )
        if _fingerprint_text(model) != spec.fingerprint:
            raise ModelRebuildError(
                f"the shaped model {dict(spec.shape)['name']!r} rebuilt in a worker differs from "
                "the sweep's (its vocabulary or tokenizer?); run the sweep with executor='serial'"
            )
        _models[spec] = model
        return model
    try:
        if spec.source == "tiny-random":
            model = tiny_random(dtype=getattr(mx, spec.dtype))
        else:
            model = load_model(spec.source, quantized=spec.quantized)
    except Exception as exc:
        raise ModelRebuildError(
            f"a sweep worker could not load the model from {spec.source!r} "
            f"({type(exc).__name__}: {exc}); run the sweep with executor='serial'"
        ) from exc
    if _fingerprint_text(model) != spec.fingerprint:
        raise ModelRebuildError(
            f"the model rebuilt from {spec.source!r} has other weights than the sweep's model "
            "(a tiny-random seed other than 0, or weights changed after loading?); run the "
            "sweep with executor='serial'"
        )
    _models[spec] = model
    return model


# -- one configuration, as a worker runs it -------------------------------------------------
@dataclass(slots=True)
class Task:
    """One sweep configuration, as it travels to a worker."""

    model: ModelSpec | ShapeSpec
    workload: Any
    scheduler: Any
    allocator: Any
    slo: dict
    engine_kwargs: dict
    # (kind, name, factory) for names registered outside cortexlab (in a notebook cell):
    # a fresh worker process has only cortexlab's own registrations.
    registered: list = field(default_factory=list)


def _registries() -> dict[str, Any]:
    from cortexlab.kv import allocators
    from cortexlab.schedulers import schedulers

    return {"scheduler": schedulers, "allocator": allocators}


def registered_elsewhere(scheduler: Any, allocator: Any) -> list[tuple[str, str, Any]]:
    """The policy names among these whose factory was registered outside cortexlab."""
    found = []
    registries = _registries()
    for kind, policy in (("scheduler", scheduler), ("allocator", allocator)):
        if isinstance(policy, str) and policy in registries[kind]:
            factory = registries[kind].get(policy)
            if not getattr(factory, "__module__", "").startswith("cortexlab."):
                found.append((kind, policy, factory))
    return found


def summarize(run: Any) -> dict[str, float]:
    """A run's summary as plain floats (what the cache stores and a worker returns)."""
    return {k: float(v) for k, v in run.summary.items()}


def run_payload(payload: bytes) -> dict[str, float]:
    """The worker function: unpickle a `Task`, run it, return its summary."""
    from cortexlab.experiment import run_workload

    task: Task = pickle.loads(payload)
    registries = _registries()
    for kind, name, factory in task.registered:
        if name not in registries[kind] or registries[kind].get(name) is not factory:
            registries[kind].register(name)(factory)  # not in the driver (a thread pool)
    run = run_workload(
        rebuild_model(task.model),
        task.workload,
        scheduler=task.scheduler,
        allocator=task.allocator,
        slo=task.slo,
        **task.engine_kwargs,
    )
    return summarize(run)


def dumps(task: Task) -> bytes:
    """`task` pickled by value where needed (cloudpickle when installed, else pickle)."""
    try:
        import cloudpickle
    except ImportError:  # plain pickle: notebook-cell classes and lambdas will not travel
        return pickle.dumps(task)
    return cloudpickle.dumps(task)


# -- executors ------------------------------------------------------------------------------
class RayExecutor(cf.Executor):
    """Ray tasks behind the `concurrent.futures.Executor` interface.

    Ray starts on the first `submit`: nothing is done when Ray is already initialised in
    this process, else ``ray.init(address, **init_options)`` (``address=None``: Ray's
    conventions, ``RAY_ADDRESS`` or a new local instance). Each task asks for one CPU;
    cortexlab must be installed on every node (the driver's code is not shipped).
    """

    def __init__(self, address: str | None = None, **init_options: Any) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError(RAY_MISSING) from None
        self._ray = ray
        self.address = address
        self.init_options = init_options
        self._remote: dict[Callable, Any] = {}

    def _start(self) -> None:
        if not self._ray.is_initialized():
            self._ray.init(address=self.address, **self.init_options)

    def capacity(self) -> int:
        """Tasks to keep in flight: twice the cluster's CPUs, so none idles between tasks
        while the payloads waiting in Ray's object store stay few."""
        self._start()
        return max(1, 2 * int(self._ray.cluster_resources().get("CPU", 1)))

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        """Run ``fn(*args, **kwargs)`` as a Ray task; its result as a Future."""
        ray = self._ray
        self._start()
        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=1)(fn)
        return self._remote[fn].remote(*args, **kwargs).future()


def check(executor: Any, max_workers: int | None) -> None:
    """Reject an unknown executor or a bad `max_workers` before anything runs."""
    if isinstance(executor, str):
        valid = executor in EXECUTORS
    else:
        valid = callable(getattr(executor, "submit", None))
    if not valid:
        raise ValueError(
            f"executor must be one of {', '.join(map(repr, EXECUTORS))} or an object with "
            f"submit(fn, *args) -> Future (a concurrent.futures.Executor); got {executor!r}"
        )
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ImportError(RAY_MISSING) from None
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
    ):
        raise ValueError(f"max_workers must be None or an int >= 1, got {max_workers!r}")


@dataclass(slots=True)
class Job:
    """A configuration to run: where its result goes, how to name it in an error."""

    index: int
    describe: str
    run_here: Callable[[], dict[str, float]]  # with the caller's model, in this process
    task: Callable[[], Task]  # built only when the job leaves this process


def _fail(exc: BaseException, job: Job, num_done: int) -> None:
    # The exception keeps its own type (a ValueError stays one whatever the executor); the
    # note says which configuration raised it and that finished ones are not lost.
    what = "a worker process died" if isinstance(exc, BrokenProcessPool) else "failed"
    note = (
        f"sweep: configuration {job.describe} {what}; {num_done} finished "
        "configuration(s) are cached, so running the sweep again resumes after them"
    )
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10
        warnings.warn(note, stacklevel=3)


def run_serial(jobs: Sequence[Job], done: Callable[[Job, dict], None]) -> None:
    """Each job here, in order, with the caller's model."""
    for num_done, job in enumerate(jobs):
        try:
            summary = job.run_here()
        except Exception as exc:
            _fail(exc, job, num_done)
            raise
        done(job, summary)


def run_parallel(
    pool: Any, jobs: Sequence[Job], limit: int | None, done: Callable[[Job, dict], None]
) -> None:
    """The jobs on `pool`, at most `limit` at once. On the first failure no new job starts;
    the running ones finish (and are cached), then the failure is raised."""
    # Pickled as they start, so a long sweep never holds every payload at once.
    queue = iter(jobs)
    running: dict[cf.Future, Job] = {}
    failure: tuple[BaseException, Job] | None = None
    num_done = 0

    def start_next() -> None:
        nonlocal failure
        for job in queue:
            try:
                running[pool.submit(run_payload, dumps(job.task()))] = job
            except Exception as exc:  # it cannot be pickled, or the pool is gone
                failure = failure or (exc, job)
            return

    for _ in range(limit or len(jobs)):
        if failure is None:
            start_next()
    while running:
        finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
        for future in finished:
            job = running.pop(future)
            try:
                summary = future.result()
            except Exception as exc:
                if "RayTaskError" in type(exc).__name__:  # Ray's wrapper: raise what fn raised
                    exc = getattr(exc, "cause", None) or exc
                failure = failure or (exc, job)
                continue
            done(job, summary)
            num_done += 1
            if failure is None:
                start_next()
    if failure is not None:
        exc, job = failure
        _fail(exc, job, num_done)
        raise exc


def process_pool(num_workers: int) -> cf.ProcessPoolExecutor:
    """A pool of spawned processes (see the module docstring for why spawn)."""
    return cf.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))


def run_jobs(
    jobs: Sequence[Job],
    done: Callable[[Job, dict], None],
    *,
    executor: Any,
    max_workers: int | None,
    is_measured: bool,
) -> None:
    """Run `jobs` on `executor` (checked by `check`), calling `done` as each finishes."""
    if not jobs or executor == "serial":
        return run_serial(jobs, done)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawned worker imports the __main__ script; one that calls sweep outside
        # `if __name__ == "__main__":` would start a sweep in every worker.
        raise RuntimeError(UNGUARDED)
    if executor == "auto":
        return _run_auto(jobs, done, max_workers=max_workers, is_measured=is_measured)
    # Measured (and wall) clocks time the forward pass: runs sharing the cores would slow
    # each other and the timings would say so. One at a time unless asked otherwise.
    if is_measured and max_workers is not None and max_workers > 1:
        warnings.warn(
            f"sweep: {max_workers} measured-clock runs at once share this machine's cores, so "
            "their timings include each other's load; use backend='sim' or max_workers=1",
            stacklevel=3,
        )
    limit = max_workers or (1 if is_measured else None)
    jobs[0].task()  # a model that workers cannot rebuild fails here, before any start
    if executor == "process":
        with process_pool(min(limit or num_cpus(), len(jobs))) as pool:
            try:
                return run_parallel(pool, jobs, limit, done)
            except BaseException as exc:
                pool.shutdown(cancel_futures=True)
                if isinstance(exc, BrokenProcessPool) and hasattr(exc, "add_note"):
                    exc.add_note(f"sweep: if this is a script, {UNGUARDED}")
                raise
    if executor == "ray":
        ray_pool = RayExecutor()
        return run_parallel(ray_pool, jobs, limit or ray_pool.capacity(), done)
    return run_parallel(executor, jobs, limit, done)


def _run_auto(
    jobs: Sequence[Job],
    done: Callable[[Job, dict], None],
    *,
    max_workers: int | None,
    is_measured: bool,
) -> None:
    """The default: processes where they make a sim sweep faster, this process otherwise.

    Measured-clock runs stay here (concurrent runs would corrupt each other's timings).
    A sim sweep runs its first configuration here; if the rest would take longer than
    `AUTO_MIN_SERIAL_SECONDS` at that pace and this machine has two or more CPUs, the rest
    runs in up to `max_workers` (default: every CPU) spawned processes. A model or policy
    that cannot travel to a process keeps the sweep here (the result is the same; run with
    executor="process" to see why it cannot).
    """
    workers = min(max_workers or num_cpus(), len(jobs) - 1)
    if is_measured or workers < 2:
        return run_serial(jobs, done)
    t0 = time.perf_counter()
    run_serial(jobs[:1], done)
    rest = jobs[1:]
    if (time.perf_counter() - t0) * len(rest) < AUTO_MIN_SERIAL_SECONDS:
        return run_serial(rest, done)
    try:
        for job in rest:  # everything must travel, else nothing goes
            dumps(job.task())
    except Exception:
        return run_serial(rest, done)
    finished: set[int] = set()

    def track(job: Job, summary: dict) -> None:
        finished.add(job.index)
        done(job, summary)

    try:
        return run_jobs(rest, track, executor="process", max_workers=workers, is_measured=False)
    except BrokenProcessPool:
        warnings.warn(f"sweep: running here instead of in processes: {UNGUARDED}", stacklevel=4)
    return run_serial([job for job in rest if job.index not in finished], done)
