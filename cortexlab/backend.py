"""Platform layer: a fast BLAS under MLX on Linux CPU, device facts, seeding.

MLX's Linux CPU wheel bundles the reference BLAS (~6 GFLOP/s fp32). Loading an
optimized CBLAS with RTLD_GLOBAL *before* mlx is first imported makes MLX's
``cblas_sgemm`` resolve to it (~85 GFLOP/s here). Loaded after mlx it changes
nothing, so this module must be imported before anything imports mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import random
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field

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
    """Which BLAS cortexlab tried to load, and which one MLX's sgemm actually resolves to.

    ``path``/``loaded``/``reason`` describe cortexlab's own load attempt; ``resolved`` is the
    shared object that ``cblas_sgemm`` binds to in this process (read from libmlx.so's GOT,
    or predicted from the global symbol scope while mlx is not loaded yet), ``how`` says
    which of the two, and ``fast`` is True when that library is not MLX's bundled
    reference BLAS. ``mapped`` lists the BLAS shared objects mapped into the process.
    """

    path: str | None = None
    loaded: bool = False
    reason: str = ""
    mlx_imported_first: bool = False
    resolved: str | None = None
    how: str = ""
    fast: bool | None = None
    mapped: list[str] = field(default_factory=list)


_blas = BlasState()
_warned = False


def _candidate_paths() -> list[str]:
    env = os.environ.get(BLAS_ENV)
    paths = [env] if env else []
    return paths + [p for p in KNOWN_BLAS_PATHS if p != env]


def load_fast_blas() -> BlasState:
    """Load an optimized CBLAS with global symbol binding (Linux only, before mlx)."""
    if _blas.loaded or _blas.reason or _blas.path:
        return _blas
    if platform.system() != "Linux":
        _blas.reason = "not Linux: MLX uses the platform's accelerated BLAS"
        return _blas
    if "mlx.core" in sys.modules:
        _blas.mlx_imported_first = True
        resolved, _ = detect_sgemm()
        if resolved is not None and not _is_reference(resolved):
            # the program loaded an optimized CBLAS globally before importing mlx itself
            _blas.path = resolved
            return _blas
        _blas.reason = "mlx was imported before cortexlab; the bundled reference BLAS is in effect"
        return _blas
    predicted, _ = detect_sgemm()
    if predicted is not None and not _is_reference(predicted):
        # an optimized CBLAS is already in the global scope (loaded by the program itself)
        _blas.path, _blas.loaded, _blas.reason = predicted, True, ""
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


# --- what the process has actually loaded (Linux) ------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


_libdl = None
_got_offsets: dict[str, int | None] = {}


def _dl():
    global _libdl
    if _libdl is None:
        _libdl = ctypes.CDLL(ctypes.util.find_library("dl") or None)
        _libdl.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        _libdl.dladdr.restype = ctypes.c_int
        _libdl.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _libdl.dlsym.restype = ctypes.c_void_p
    return _libdl


def _library_of(addr: int | None) -> str | None:
    """The shared object containing ``addr`` (dladdr), as a real path."""
    if not addr:
        return None
    info = _DlInfo()
    if not _dl().dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _mapped_objects() -> dict[str, int]:
    """Shared objects mapped into this process, each with its lowest mapped address."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or ".so" not in parts[5]:
                    continue
                path = parts[5].strip()
                start = int(parts[0].split("-")[0], 16)
                if path not in out or start < out[path]:
                    out[path] = start
    except OSError:
        pass
    return out


def _is_blas_name(path: str) -> bool:
    name = os.path.basename(path).lower()
    return any(k in name for k in ("blas", "mkl_rt", "mkl_intel", "blis", "accelerate"))


def _is_reference(path: str) -> bool:
    """MLX's bundled reference BLAS (``mlx*.libs/libblas-<hash>.so``, or the mlx package)."""
    parent = os.path.basename(os.path.dirname(path))
    return (parent.startswith("mlx") and parent.endswith(".libs")) or "/mlx/" in path


def _got_slot(elf_path: str, symbol: str) -> tuple[int, int] | None:
    """(GOT offset of ``symbol``'s relocation, first PT_LOAD vaddr) in a 64-bit ELF."""
    with open(elf_path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None  # only 64-bit little-endian
        e_phoff, e_shoff = struct.unpack_from("<QQ", head, 0x20)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", head, 0x36)
        f.seek(e_phoff)
        ph = f.read(e_phentsize * e_phnum)
        loads = [
            struct.unpack_from("<Q", ph, i * e_phentsize + 0x10)[0]
            for i in range(e_phnum)
            if struct.unpack_from("<I", ph, i * e_phentsize)[0] == 1  # PT_LOAD
        ]
        f.seek(e_shoff)
        sh = f.read(e_shentsize * e_shnum)
        secs = [struct.unpack_from("<IIQQQQIIQQ", sh, i * e_shentsize) for i in range(e_shnum)]

        def read(sec):
            f.seek(sec[4])
            return f.read(sec[5])

        for sec in secs:
            if sec[1] != 4:  # SHT_RELA
                continue
            symtab = secs[sec[6]]
            strtab_sec = secs[symtab[6]]
            rela, syms, strs = read(sec), read(symtab), read(strtab_sec)
            want = symbol.encode()
            for off in range(0, len(rela) - 23, 24):
                r_offset, r_info = struct.unpack_from("<QQ", rela, off)
                sym_idx = r_info >> 32
                if sym_idx == 0:
                    continue
                st_name = struct.unpack_from("<I", syms, sym_idx * 24)[0]
                end = strs.find(b"\0", st_name)
                if strs[st_name:end] == want:
                    return r_offset, (min(loads) if loads else 0)
    return None


def detect_sgemm() -> tuple[str | None, str]:
    """Which shared object MLX's ``cblas_sgemm`` resolves to in this process, and how we know.

    With libmlx.so mapped, its GOT slot for ``cblas_sgemm`` is read (Python loads extension
    modules with RTLD_NOW, so it is bound at import) and ``dladdr`` names the library the
    pointer lands in. Before mlx is loaded (or with a still-lazy slot) the answer is
    predicted: the global scope (``dlsym(RTLD_DEFAULT)``: the program and every library
    loaded with RTLD_GLOBAL) is searched before libmlx.so's own dependencies, so a
    ``cblas_sgemm`` found there wins; otherwise the bundled reference BLAS does.
    """
    if platform.system() != "Linux":
        return None, "not Linux"
    mapped = _mapped_objects()
    libmlx = next((p for p in mapped if os.path.basename(p) == "libmlx.so"), None)
    if libmlx is not None:
        if libmlx not in _got_offsets:
            try:
                _got_offsets[libmlx] = _got_slot(libmlx, "cblas_sgemm")
            except (OSError, struct.error, IndexError):
                _got_offsets[libmlx] = None
        slot = _got_offsets[libmlx]
        if slot is not None:
            r_offset, first_vaddr = slot
            base = mapped[libmlx] - (first_vaddr & ~(os.sysconf("SC_PAGE_SIZE") - 1))
            target = _library_of(ctypes.c_void_p.from_address(base + r_offset).value)
            if target is not None and os.path.basename(target) != "libmlx.so":
                return target, "libmlx.so GOT"
    found = _library_of(_dl().dlsym(None, b"cblas_sgemm"))
    if found is not None:
        return found, "global symbol scope"
    ref = next((p for p in mapped if _is_blas_name(p) and _is_reference(p)), None)
    return ref, "mlx's own dependency" if ref else "unresolved"


def refresh_blas_state() -> BlasState:
    """Re-read which BLAS is in effect from the process's loaded objects."""
    if platform.system() != "Linux":
        _blas.fast, _blas.how = True, "not Linux"
        return _blas
    if _blas.how == "libmlx.so GOT":
        return _blas  # bound at mlx's import (RTLD_NOW): it cannot change any more
    _blas.resolved, _blas.how = detect_sgemm()
    _blas.mapped = [p for p in _mapped_objects() if _is_blas_name(p)]
    _blas.fast = _blas.resolved is not None and not _is_reference(_blas.resolved)
    return _blas


def blas_state() -> BlasState:
    """The BLAS load attempt's outcome and the BLAS actually in effect (refreshed)."""
    return refresh_blas_state()


def is_reference_blas() -> bool:
    """True when MLX runs on Linux with its bundled reference BLAS (as actually resolved)."""
    return platform.system() == "Linux" and not refresh_blas_state().fast


def warn_if_slow() -> None:
    """Warn once when the reference BLAS is in effect, naming the fix."""
    global _warned
    if _warned or not is_reference_blas():
        return
    _warned = True
    reason = _blas.reason or "no optimized CBLAS was loaded before mlx"
    warnings.warn(
        f"cortexlab: MLX is using its reference BLAS ({reason}); fp32 matmul is ~10x "
        f"slower. Fix: {BLAS_FIX}.",
        RuntimeWarning,
        stacklevel=3,
    )


load_fast_blas()

import mlx.core as mx  # noqa: E402  (must come after load_fast_blas)
import numpy as np  # noqa: E402

refresh_blas_state()


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
    state = refresh_blas_state()
    if state.fast:
        kind = "OpenBLAS" if "openblas" in (state.resolved or "").lower() else "optimized CBLAS"
        return f"{kind}: {state.resolved} (cblas_sgemm bound via {state.how})"
    reason = state.reason or "no optimized CBLAS was loaded before mlx"
    where = f"{state.resolved}, " if state.resolved else ""
    return f"MLX bundled reference BLAS ({where}{reason})"


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
        "blas_fast": not is_reference_blas(),
        "cpu_count": os.cpu_count(),
    }
    if measure:
        out["fp32_matmul_gflops"] = round(matmul_gflops(), 1)
    return out
