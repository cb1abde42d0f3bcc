"""Platform: fast BLAS detection and loading order, info(), seeding."""

from __future__ import annotations

import os
import subprocess
import sys

import cortexlab as cl
from cortexlab import backend

import mlx.core as mx
import numpy as np
import pytest

DEBIAN_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
needs_openblas = pytest.mark.skipif(
    not os.path.exists(DEBIAN_OPENBLAS) or sys.platform != "linux",
    reason="Debian's libopenblas0-pthread is not installed",
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


@needs_openblas
def test_openblas_loaded_before_mlx():
    state = backend.blas_state()
    assert state.loaded and state.path == DEBIAN_OPENBLAS
    assert "OpenBLAS" in backend.blas_description()
    assert not backend.is_reference_blas()


@needs_openblas
def test_env_override_missing_file_falls_back_to_known_paths():
    out = run_python(
        "import cortexlab.backend as b; s = b.blas_state(); print(s.loaded, s.path)",
        CORTEXLAB_BLAS="/nonexistent/libblas.so",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", DEBIAN_OPENBLAS]


def test_env_override_is_tried_first(tmp_path):
    bogus = tmp_path / "libnotblas.so"
    bogus.write_text("not a shared object")
    out = run_python(
        f"import cortexlab.backend as b; s = b.blas_state(); print(s.path != {str(bogus)!r})",
        CORTEXLAB_BLAS=str(bogus),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(sys.platform != "linux", reason="the reference-BLAS fallback is Linux-only")
def test_mlx_imported_first_warns_with_the_fix():
    out = run_python(
        "import mlx.core, cortexlab as cl; i = cl.info(measure=False); print(i['blas'])"
    )
    assert out.returncode == 0, out.stderr
    assert "reference BLAS" in out.stdout and "imported before cortexlab" in out.stdout
    assert "RuntimeWarning" in out.stderr and "libopenblas0-pthread" in out.stderr


@needs_openblas
def test_detection_cortexlab_first_reports_the_fast_blas():
    out = run_python(
        "import cortexlab as cl; from cortexlab import backend as b; s = b.blas_state(); "
        "print(s.fast, s.how, s.resolved); print(cl.info(measure=False)['blas'])"
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("True libmlx.so GOT /usr/lib/")
    assert "OpenBLAS" in second and "RuntimeWarning" not in out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the reference-BLAS fallback is Linux-only")
def test_detection_mlx_first_reports_the_reference_blas():
    out = run_python(
        "import mlx.core; from cortexlab import backend as b; s = b.blas_state(); "
        "print(s.fast, s.how, s.resolved)"
    )
    assert out.returncode == 0, out.stderr
    fast, how, resolved = out.stdout.split(maxsplit=2)
    assert (fast, how) == ("False", "libmlx.so")
    assert "mlx" in resolved and "libblas" in resolved


@needs_openblas
def test_script_that_loads_openblas_itself_is_told_the_truth():
    # the program puts OpenBLAS in the global scope itself, then imports mlx, then cortexlab
    out = run_python(
        "import ctypes; "
        f"ctypes.CDLL({DEBIAN_OPENBLAS!r}, mode=ctypes.RTLD_GLOBAL); "
        "import mlx.core; import cortexlab as cl; from cortexlab import backend as b; "
        "s = b.blas_state(); print(s.fast, s.resolved); i = cl.info(measure=False); "
        "print(i['blas_fast'], i['blas'])"
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == f"True {DEBIAN_OPENBLAS}"
    assert second.startswith("True OpenBLAS")
    assert "RuntimeWarning" not in out.stderr


@needs_openblas
def test_openblas_loaded_after_mlx_is_still_reported_as_reference():
    # loaded after mlx's import it is mapped but not bound: MLX still calls the reference BLAS
    out = run_python(
        "import mlx.core, ctypes; "
        f"ctypes.CDLL({DEBIAN_OPENBLAS!r}, mode=ctypes.RTLD_GLOBAL); "
        "import cortexlab as cl; from cortexlab import backend as b; s = b.blas_state(); "
        "print(s.fast, any('openblas' in p for p in s.mapped)); "
        "print(cl.info(measure=False)['blas'])"
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "False True"
    assert "reference BLAS" in second and "RuntimeWarning" in out.stderr


def test_info_reports_versions_device_and_speed():
    info = cl.info()
    for key in ("mlx", "mlx-lm", "device", "blas", "fp32_matmul_gflops"):
        assert key in info
    assert info["mlx"] == mx.__version__
    assert info["device"] in ("cpu", "gpu")
    assert info["fp32_matmul_gflops"] > 0


def test_seed_seeds_python_numpy_and_mlx():
    import random

    cl.seed(7)
    a = (random.random(), np.random.rand(), mx.random.uniform().item())
    cl.seed(7)
    b = (random.random(), np.random.rand(), mx.random.uniform().item())
    assert a == b
