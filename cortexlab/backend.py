"""Platform layer: a fast BLAS under MLX on Linux CPU, device facts, seeding.

MLX's Linux CPU wheel bundles the reference BLAS (~6 GFLOP/s fp32). Loading an
optimized CBLAS with RTLD_GLOBAL *before* mlx is first imported makes MLX's
``cblas_sgemm`` resolve to it (~85 GFLOP/s here). Loaded after mlx it changes
nothing, so this module must be imported before anything imports mlx.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass

BLAS_ENV = "CORTEXLAB_BLAS"
# Debian/Ubuntu locations first (libopenblas0-pthread), then other common layouts.
KNOWN_BLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)
BLAS_FIX = (
    "install OpenBLAS (`apt-get install libopenblas0-pthread`) or point "
    f"{BLAS_ENV} at an optimized CBLAS, then restart Python before importing mlx"
)


@dataclass(slots=True)
class BlasState:
    """Which BLAS cortexlab tried to load and whether it is in effect."""

    path: str | None = None
    loaded: bool = False
    reason: str = ""
    mlx_imported_first: bool = False


_blas = BlasState()
_warned = False


def _candidate_paths() -> list[str]:
    env = os.environ.get(BLAS_ENV)
    paths = [env] if env else []
    return paths + [p for p in KNOWN_BLAS_PATHS if p != env]


def load_fast_blas() -> BlasState:
    """Load an optimized CBLAS with global symbol binding (Linux only, before mlx)."""
    if _blas.loaded or _blas.reason:
        return _blas
    if platform.system() != "Linux":
        _blas.reason = "not Linux: MLX uses the platform's accelerated BLAS"
        return _blas
    if "mlx.core" in sys.modules:
        _blas.mlx_imported_first = True
        _blas.reason = "mlx was imported before cortexlab; the bundled reference BLAS is in effect"
        return _blas
    env = os.environ.get(BLAS_ENV)
    for path in _candidate_paths():
        if not os.path.exists(path):
            if path == env:
                _blas.reason = f"{BLAS_ENV}={path} does not exist"
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            _blas.reason = f"could not load {path}: {exc}"
            continue
        _blas.path, _blas.loaded, _blas.reason = path, True, ""
        return _blas
    _blas.reason = _blas.reason or "no optimized BLAS found at " + ", ".join(_candidate_paths())
    return _blas


def blas_state() -> BlasState:
    """The BLAS load attempt's outcome."""
    return _blas


def is_reference_blas() -> bool:
    """True when MLX runs on Linux with its bundled reference BLAS."""
    return platform.system() == "Linux" and not _blas.loaded


def warn_if_slow() -> None:
    """Warn once when the reference BLAS is in effect, naming the fix."""
    global _warned
    if _warned or not is_reference_blas():
        return
    _warned = True
    warnings.warn(
        f"cortexlab: MLX is using its reference BLAS ({_blas.reason}); fp32 matmul is ~10x "
        f"slower. Fix: {BLAS_FIX}.",
        RuntimeWarning,
        stacklevel=3,
    )


load_fast_blas()

import mlx.core as mx  # noqa: E402  (must come after load_fast_blas)
import numpy as np  # noqa: E402


def seed(n: int) -> None:
    """Seed Python's, numpy's and MLX's random generators."""
    random.seed(n)
    np.random.seed(n)
    mx.random.seed(n)


def default_device() -> str:
    """The MLX default device as a short string, e.g. 'cpu' or 'gpu'."""
    return str(mx.default_device()).removeprefix("Device(").removesuffix(")").split(",")[0]


def is_gpu() -> bool:
    """True when MLX's default device is a GPU."""
    return mx.default_device() == mx.gpu


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 square-matmul throughput on the default device, GFLOP/s."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def blas_description() -> str:
    """The BLAS MLX's CPU matmul resolves to, in words."""
    if platform.system() != "Linux":
        return "platform BLAS (Accelerate)" if platform.system() == "Darwin" else "platform BLAS"
    if _blas.loaded:
        return f"OpenBLAS-compatible CBLAS: {_blas.path}"
    return f"MLX bundled reference BLAS ({_blas.reason})"


def info(*, measure: bool = True) -> dict:
    """Versions, device, BLAS in effect and (optionally) measured fp32 matmul GFLOP/s."""
    from importlib.metadata import PackageNotFoundError, version

    def _ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    warn_if_slow()
    out = {
        "cortexlab": _ver("cortexlab"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": _ver("mlx"),
        "mlx-lm": _ver("mlx-lm"),
        "device": default_device(),
        "blas": blas_description(),
        "cpu_count": os.cpu_count(),
    }
    if measure:
        out["fp32_matmul_gflops"] = round(matmul_gflops(), 1)
    return out
