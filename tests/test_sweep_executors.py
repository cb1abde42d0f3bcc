"""Where sweep runs its configurations: serial, local processes, any Executor (Ray has its
own file, tests/test_sweep_ray.py); same rows and the same cache whichever runs them."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import pickle
import sys
import threading
import warnings

import cortexlab as cl
from cortexlab import executors, experiment
from cortexlab.schedulers import FCFSScheduler

import pandas as pd
import pytest

CM = cl.sim.CostModel(step_s=2e-3, prefill_token_s=2e-5, decode_row_s=5e-4)
LIMITS = {"block_size": 4, "num_blocks": 24, "max_num_seqs": 3}
SIM = {"backend": "sim", "cost_model": CM, "progress": False, **LIMITS}
GRID = {"schedulers": ["fcfs", "sjf"], "rates": [20.0, 80.0]}


def workload(rate: float = 40.0, seed: int = 0) -> cl.workloads.Workload:
    return cl.workloads.poisson(
        rate, num_requests=6, prompt_len=cl.workloads.Uniform(4, 16), output_len=4, seed=seed
    )


class PatientFCFS(FCFSScheduler):
    """A scheduler registered outside cortexlab: its name must travel with it."""


@pytest.fixture
def registered_here():
    """PatientFCFS under a name, for one test (other tests list the registered names)."""
    name = "patient_fcfs_for_sweep_tests"
    cl.schedulers.register(name)(PatientFCFS)
    yield name
    del cl.schedulers.schedulers._factories[name]


def cached(folder) -> dict[str, dict]:
    return {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def serial_rows(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serial")
    rows = cl.sweep(tiny, workload(), cache_dir=folder, executor="serial", **GRID, **SIM)
    return rows, cached(folder)


# -- bad input ------------------------------------------------------------------------------
def test_unknown_executor_names_the_allowed_ones(tiny):
    with pytest.raises(ValueError, match="'auto', 'serial', 'process', 'ray'.*got 'threads'"):
        cl.sweep(tiny, workload(), executor="threads", cache_dir=None)
    with pytest.raises(ValueError, match=r"submit\(fn, \*args\) -> Future"):
        cl.sweep(tiny, workload(), executor=object(), cache_dir=None)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_workers_must_be_a_positive_int(tiny, bad):
    with pytest.raises(ValueError, match=f"max_workers must be None or an int >= 1, got {bad}"):
        cl.sweep(tiny, workload(), executor="process", max_workers=bad, cache_dir=None)


def test_ray_without_ray_says_what_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'cortexlab\[ray\]'"):
        cl.sweep(tiny, workload(), executor="ray", cache_dir=None)


def test_a_model_workers_cannot_rebuild_is_an_error_naming_serial():
    other_seed = cl.models.tiny_random(seed=1)  # its source says "tiny-random" (seed 0)
    with pytest.raises(executors.ModelRebuildError, match="executor='serial'"):
        cl.sweep(other_seed, workload(), executor="process", cache_dir=None, **SIM)
    made_here = cl.models.tiny_random()
    made_here.source = "a notebook cell"
    with pytest.raises(executors.ModelRebuildError, match="executor='serial'"):
        executors.model_spec(made_here)
    # ... while serial runs it as it is.
    assert len(cl.sweep(other_seed, workload(), executor="serial", cache_dir=None, **SIM)) == 1


# -- same rows, same cache ------------------------------------------------------------------
def test_processes_resume_a_serial_sweep_with_the_same_rows_and_cache(tiny, serial_rows, tmp_path):
    rows, files = serial_rows
    # Half the grid first, here; then processes run only the missing half.
    half = cl.sweep(tiny, workload(), cache_dir=tmp_path, executor="serial", rates=[20.0], **SIM)
    assert len(half) == 1 and len(cached(tmp_path)) == 1
    (path,) = tmp_path.glob("*.json")
    marked = json.loads(path.read_text()) | {"num_preemptions": 99.0}
    path.write_text(json.dumps(marked))  # a recomputed configuration would lose the mark
    again = cl.sweep(
        tiny, workload(), cache_dir=tmp_path, executor="process", max_workers=2, **GRID, **SIM
    )
    assert again.loc[0, "num_preemptions"] == 99.0
    again.loc[0, "num_preemptions"] = rows.loc[0, "num_preemptions"]
    pd.testing.assert_frame_equal(again, rows)
    assert cached(tmp_path).keys() == files.keys()


def test_a_shaped_model_travels_as_its_shape_and_tokenizer(tiny, monkeypatch):
    shaped = cl.sim.shaped_model("llama-2-7b", tokenizer=tiny, max_context=2048)
    spec = executors.model_spec(shaped)
    assert isinstance(spec, executors.ShapeSpec)
    args = {"cache_dir": None, **GRID, **SIM, "cost_model": cl.sim.roofline("llama-2-7b", "h100")}
    serial = cl.sweep(shaped, workload(), executor="serial", **args)
    monkeypatch.setattr(executors, "_models", {})  # as in a fresh worker process
    rebuilt = executors.rebuild_model(pickle.loads(pickle.dumps(spec)))
    assert rebuilt is not shaped and isinstance(rebuilt, type(shaped))
    assert (rebuilt.name, rebuilt.max_context, rebuilt.vocab_size) == ("llama-2-7b", 2048, 32000)
    assert rebuilt.kv_bytes_per_token == shaped.kv_bytes_per_token
    assert rebuilt.tokenizer.encode("a lighthouse") == shaped.tokenizer.encode("a lighthouse")
    with cf.ThreadPoolExecutor(2) as pool:  # the workers' path: spec, payload, rebuild
        pd.testing.assert_frame_equal(cl.sweep(shaped, workload(), executor=pool, **args), serial)
    stale = dataclasses.replace(spec, fingerprint="{}")  # the caller's model was another
    with pytest.raises(executors.ModelRebuildError, match="differs from the sweep's"):
        executors.rebuild_model(stale)


def test_any_executor_object_gives_the_same_rows(tiny, serial_rows, tmp_path):
    rows, files = serial_rows
    with cf.ThreadPoolExecutor(2) as pool:  # a pool the caller keeps: sweep leaves it open
        got = cl.sweep(tiny, workload(), cache_dir=tmp_path, executor=pool, **GRID, **SIM)
        assert pool.submit(int, "3").result() == 3
    pd.testing.assert_frame_equal(got, rows)
    assert cached(tmp_path) == files


def test_a_name_registered_outside_cortexlab_travels_with_its_class(tiny, registered_here):
    found = executors.registered_elsewhere(registered_here, "paged")
    assert found == [("scheduler", registered_here, PatientFCFS)]
    assert executors.registered_elsewhere("fcfs", "paged") == []
    args = {"cache_dir": None, "schedulers": [registered_here], **SIM}
    with cf.ThreadPoolExecutor(1) as pool:
        pd.testing.assert_frame_equal(
            cl.sweep(tiny, workload(), executor=pool, **args),
            cl.sweep(tiny, workload(), executor="serial", **args),
        )


# -- failures -------------------------------------------------------------------------------
@pytest.mark.parametrize("executor", ["serial", "threads"])
def test_a_failing_configuration_is_named_and_the_finished_ones_are_cached(
    tiny, tmp_path, executor
):
    args = {"allocators": ["paged", "no_such_allocator"], "cache_dir": tmp_path, **SIM}
    pool = cf.ThreadPoolExecutor(1) if executor == "threads" else "serial"
    with pytest.raises(KeyError, match="unknown allocator 'no_such_allocator'") as info:
        cl.sweep(tiny, workload(), executor=pool, **args)
    if sys.version_info >= (3, 11):
        (note,) = info.value.__notes__
        assert "allocator='no_such_allocator'" in note and "1 finished" in note
    assert len(cached(tmp_path)) == 1  # the paged run is kept: a rerun resumes after it


# -- the default ----------------------------------------------------------------------------
def spy_pool(monkeypatch) -> list[int]:
    """Make "process" use threads (no spawn cost) and record the pool sizes asked for."""
    sizes: list[int] = []

    def pool(num_workers):
        sizes.append(num_workers)
        return cf.ThreadPoolExecutor(num_workers)

    monkeypatch.setattr(executors, "process_pool", pool)
    monkeypatch.setattr(executors, "num_cpus", lambda: 2)
    return sizes


def test_auto_keeps_small_and_measured_sweeps_here(tiny, serial_rows, monkeypatch):
    sizes = spy_pool(monkeypatch)
    rows, _ = serial_rows
    pd.testing.assert_frame_equal(cl.sweep(tiny, workload(), cache_dir=None, **GRID, **SIM), rows)
    monkeypatch.setattr(executors, "AUTO_MIN_SERIAL_SECONDS", 0.0)
    measured = {"cache_dir": None, "progress": False, **LIMITS}
    assert len(cl.sweep(tiny, workload(), rates=[20.0, 80.0], **measured)) == 2
    assert sizes == []


def test_auto_moves_a_long_sim_sweep_to_processes(tiny, serial_rows, monkeypatch):
    sizes = spy_pool(monkeypatch)
    monkeypatch.setattr(executors, "AUTO_MIN_SERIAL_SECONDS", 0.0)
    rows, _ = serial_rows
    pd.testing.assert_frame_equal(cl.sweep(tiny, workload(), cache_dir=None, **GRID, **SIM), rows)
    assert sizes == [2]  # the first configuration ran here, the other three on two workers


def test_auto_stays_here_when_the_model_cannot_travel(monkeypatch):
    sizes = spy_pool(monkeypatch)
    monkeypatch.setattr(executors, "AUTO_MIN_SERIAL_SECONDS", 0.0)
    other_seed = cl.models.tiny_random(seed=1)
    assert len(cl.sweep(other_seed, workload(), cache_dir=None, **GRID, **SIM)) == 4
    assert sizes == []


def test_measured_runs_side_by_side_warn(tiny):
    # One configuration: the warning is about the setting; threads sharing one MLX model
    # are not something to run here.
    measured = {"cache_dir": None, "progress": False, **LIMITS}
    with cf.ThreadPoolExecutor(2) as pool, pytest.warns(UserWarning, match="timings include"):
        cl.sweep(tiny, workload(), executor=pool, max_workers=2, **measured)
    with cf.ThreadPoolExecutor(2) as pool, warnings.catch_warnings():
        warnings.simplefilter("error")  # one at a time (the default for measured): no warning
        cl.sweep(tiny, workload(), executor=pool, **measured)


def test_serial_uses_the_callers_model_and_run_workload(tiny, monkeypatch):
    seen = []

    def run_workload(model, wl, **kwargs):
        seen.append(model)
        return experiment.Run("x", {}, None, {"num_finished": 6.0}, 0.0)

    monkeypatch.setattr(experiment, "run_workload", run_workload)
    rows = cl.sweep(tiny, workload(), executor="serial", cache_dir=None, **SIM)
    assert seen == [tiny] and rows.loc[0, "num_finished"] == 6.0


class LockedFCFS(FCFSScheduler):
    """A policy object that cannot be pickled (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_a_configuration_that_cannot_travel_is_named(tiny):
    with pytest.raises(TypeError, match="pickle") as info:
        cl.sweep(
            tiny, workload(), schedulers=[LockedFCFS()], executor="process", cache_dir=None, **SIM
        )
    if sys.version_info >= (3, 11):
        assert "scheduler='fcfs'" in info.value.__notes__[0]
