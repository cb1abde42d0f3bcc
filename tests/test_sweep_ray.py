"""cl.sweep(executor="ray") on a local Ray started here: the same rows and cache keys as a
serial sweep, and either one resumes the other's partial cache."""

from __future__ import annotations

import json

import cortexlab as cl
from cortexlab import experiment

import pandas as pd
import pytest

# `make setup` installs the `ray` extra, so this runs in CI; the skip is for a venv set up
# by hand without it (where tests/test_sweep_executors.py checks the install hint).
ray = pytest.importorskip("ray")

CM = cl.sim.CostModel(step_s=2e-3, prefill_token_s=2e-5, decode_row_s=5e-4)
SIM = {
    "backend": "sim",
    "cost_model": CM,
    "progress": False,
    "block_size": 4,
    "num_blocks": 24,
    "max_num_seqs": 3,
}
GRID = {"schedulers": ["fcfs", "sjf"], "rates": [20.0, 80.0], "allocators": ["paged", "prefix"]}


def workload(rate: float = 40.0, seed: int = 0) -> cl.workloads.Workload:
    return cl.workloads.poisson(
        rate, num_requests=6, prompt_len=cl.workloads.Uniform(4, 16), output_len=4, seed=seed
    )


def cached(folder) -> dict[str, dict]:
    return {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray (never one named by RAY_ADDRESS), small enough for a CI container:
    two CPUs, no dashboard, a small object store (Ray falls back to /tmp when /dev/shm is
    smaller than it wants)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=80 * 2**20,
            log_to_driver=False,
        )
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def serial(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serial")
    rows = cl.sweep(tiny, workload(), cache_dir=folder, executor="serial", **GRID, **SIM)
    return rows, cached(folder)


def test_ray_gives_the_serial_rows_and_cache(tiny, local_ray, serial, tmp_path):
    rows, files = serial
    got = cl.sweep(tiny, workload(), cache_dir=tmp_path, executor="ray", **GRID, **SIM)
    assert local_ray.is_initialized()  # sweep used the Ray it found
    pd.testing.assert_frame_equal(got, rows)
    assert cached(tmp_path) == files  # the same keys and summaries, written by the driver


def test_ray_and_serial_resume_each_other(tiny, local_ray, serial, tmp_path, monkeypatch):
    rows, files = serial
    first = {"schedulers": ["fcfs"], "rates": [20.0, 80.0], "allocators": ["paged", "prefix"]}
    cl.sweep(tiny, workload(), cache_dir=tmp_path, executor="serial", **first, **SIM)
    path = sorted(tmp_path.glob("*.json"))[0]
    path.write_text(json.dumps(json.loads(path.read_text()) | {"num_preemptions": 99.0}))
    # Ray runs only the missing half: the marked summary comes back as it is.
    got = cl.sweep(tiny, workload(), cache_dir=tmp_path, executor="ray", **GRID, **SIM)
    assert (got["num_preemptions"] == 99.0).sum() == 1
    assert cached(tmp_path).keys() == files.keys()
    # ... and a serial rerun finds everything cached.
    monkeypatch.setattr(experiment, "run_workload", None)  # calling it would fail
    again = cl.sweep(tiny, workload(), cache_dir=tmp_path, executor="serial", **GRID, **SIM)
    pd.testing.assert_frame_equal(again, got)
    marked = again["num_preemptions"] == 99.0
    pd.testing.assert_frame_equal(again[~marked], rows[~marked])
