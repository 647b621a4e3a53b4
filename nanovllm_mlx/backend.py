"""Pick the fastest BLAS before MLX loads, and describe the backend in use.

The Linux `mlx-cpu` wheel links a reference BLAS (~5 GFLOP/s for float32 matmul here).
MLX resolves `cblas_sgemm` at load time, so an MKL or OpenBLAS loaded with RTLD_GLOBAL
*before* `import mlx.core` takes its place (~340 GFLOP/s for MKL on the same machine). This
module must therefore be imported before anything imports mlx.

Order: NANOVLLM_BLAS, then the `mkl` wheel this package depends on (Linux x86-64), then a
system OpenBLAS, then an MKL in the environment's lib/ (conda). The pip-installed one
comes first so that every machine runs what `pip install` gave it, CI included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Callable

_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/local/lib/libopenblas.so.0",
]

blas_in_use: str = "platform default"
blas_library: str | None = None  # the fast BLAS loaded, None while MLX's own is in use
_blas_threads: list = []  # the loaded BLAS's thread-count setters
_fast_blas_found: bool = False  # one existed, whether or not it could still be loaded
_notice_given = False
_why_slow = "no MKL or OpenBLAS found"  # while blas_library is None

SLOW_BLAS_HINT = (
    "`pip install mkl` (Linux x86-64) or `apt-get install libopenblas0-pthread`, then run again"
)


def _pip_mkl_paths() -> list[str]:
    """libmkl_rt from the `mkl` wheel, found through the files its installation recorded.

    pip puts the wheel's libraries in the lib/ of wherever it installed (a venv, --user,
    /usr/local), which sys.prefix does not always name; the record always does.
    """
    try:
        dist = importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        return []
    found = (dist.locate_file(f) for f in dist.files or [] if f.name.startswith("libmkl_rt.so"))
    return sorted(os.path.realpath(str(path)) for path in found)


def _conda_mkl_paths() -> list[str]:
    # conda's mkl has no Python metadata; it puts libmkl_rt in the environment's lib/.
    return sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))


def _system_openblas_paths() -> list[str]:
    found = ctypes.util.find_library("openblas")
    return [p for p in _CANDIDATES if os.path.exists(p)] + ([found] if found else [])


def keep_freed_memory() -> bool:
    """Stop glibc from returning large freed buffers to the OS (Linux CPU).

    MLX's CPU allocator gets each large temporary (a step's gathered K/V, logits) from
    malloc; above glibc's mmap threshold every such buffer is a fresh mmap, page-faulted
    in on first touch and unmapped on free. Copying 45 MB took 28 ms that way and 3.7 ms
    with the heap kept (measured here). An inference process reuses the same sizes every
    step, so keeping them is the right trade.
    """
    if not sys.platform.startswith("linux") or os.environ.get("NANOVLLM_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc (musl): nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def load_fast_blas() -> str:
    """Load an optimized BLAS globally if one is found; return what is in use.

    NANOVLLM_BLAS=/path/to/lib forces a library, NANOVLLM_BLAS=none keeps MLX's own.
    Only Linux CPU builds need this: macOS uses Accelerate, CUDA builds use cuBLAS.
    """
    global blas_in_use, blas_library, _fast_blas_found, _why_slow
    if not sys.platform.startswith("linux"):
        return blas_in_use
    forced = os.environ.get("NANOVLLM_BLAS", "").strip()
    if forced.lower() == "none":
        _why_slow = "NANOVLLM_BLAS=none"
        blas_in_use = f"bundled reference BLAS ({_why_slow})"
        return blas_in_use
    paths = [forced] if forced else []
    paths += _pip_mkl_paths() + _system_openblas_paths() + _conda_mkl_paths()
    _fast_blas_found = any(not p.startswith("/") or os.path.exists(p) for p in paths)
    if "mlx.core" in sys.modules:
        _why_slow = "mlx was imported before nanovllm_mlx"
        blas_in_use = f"bundled reference BLAS ({_why_slow})"
        if _fast_blas_found:  # only then would importing in the other order have helped
            warnings.warn(
                "mlx.core was imported before nanovllm_mlx, so the fast BLAS cannot be "
                "loaded: float32 matmul on CPU will be ~30x slower. Import nanovllm_mlx first.",
                stacklevel=3,
            )
        return blas_in_use
    for path in dict.fromkeys(paths):
        if path.startswith("/") and not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        # MKL keeps its default threading (Intel OpenMP): on a quiet 2-core machine the
        # default model's `ask --verbose` prefilled 287-332 tok/s and decoded 22.5-27.7
        # with it against 224-225 and 17.1-17.4 sequential. Sequential won only while other
        # jobs loaded the cores; MKL_THREADING_LAYER=SEQUENTIAL asks for it there.
        blas_in_use = blas_library = path
        if hasattr(lib, "MKL_Get_Max_Threads"):
            # Settle MKL's threading layer now, while its own OpenMP is the only one in the
            # process: left to the first matmul, a GNU OpenMP loaded meanwhile (importing
            # torch, as transformers and mlx-lm do) was picked instead and a 1024x1024
            # float32 matrix-vector product took 8.0 ms instead of 0.23 (a tiny Llama's
            # decode 24 tok/s instead of 390).
            lib.MKL_Get_Max_Threads()
        _blas_threads.extend(
            getattr(lib, name)
            for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads")
            if hasattr(lib, name)
        )
        return blas_in_use
    if forced:
        _why_slow = f"NANOVLLM_BLAS={forced} could not be loaded"
    blas_in_use = f"bundled reference BLAS (slow: {SLOW_BLAS_HINT})"
    return blas_in_use


def slow_blas_notice() -> str | None:
    """One line saying that MLX's slow reference BLAS does the CPU matmuls, and why; None
    when a fast one is loaded or the device is not the CPU (or on macOS: Accelerate)."""
    if blas_library is not None or not sys.platform.startswith("linux"):
        return None
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return None
    hint = "" if _why_slow == "NANOVLLM_BLAS=none" else f"; {SLOW_BLAS_HINT}"
    return f"note: MLX's slow reference BLAS is in use ({_why_slow}): CPU matmul ~30x slower{hint}"


def notice_once(write: Callable[[str], object]) -> None:
    """Give slow_blas_notice() through `write` the first time only."""
    global _notice_given
    notice = slow_blas_notice()
    if notice is not None and not _notice_given:
        _notice_given = True
        write(notice)


def set_blas_threads(n: int) -> None:
    """Limit the loaded BLAS to n threads, where it says how (OpenBLAS, MKL)."""
    for setter in _blas_threads:
        setter(ctypes.c_int(n))


def cpus_each(processes: int) -> int:
    """This machine's cores (those this process may use) shared among `processes`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // processes)


def describe() -> str:
    """One line naming the MLX version, device and BLAS, for verbose output."""
    import mlx.core as mx

    device = mx.default_device()
    kind = "cpu" if device == mx.cpu else ("metal" if mx.metal.is_available() else "cuda")
    blas = blas_in_use if kind == "cpu" else ("Accelerate" if kind == "metal" else "cuBLAS")
    if kind == "cpu" and sys.platform == "darwin":
        blas = "Accelerate"
    return f"MLX {mx.__version__} on {kind} ({device}), BLAS: {blas}"


def device_memory_bytes() -> int:
    """Memory the device can use: the GPU's on CUDA/Metal, physical RAM on CPU."""
    import mlx.core as mx

    try:
        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if int(info.get(key, 0)) > 0:
                return int(info[key])
    except (AttributeError, RuntimeError, TypeError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """Memory a new allocation can still take without pushing the machine into swap or the
    OOM killer: MemAvailable on a Linux CPU (it counts reclaimable page cache), the
    device's memory less what MLX already holds on a GPU."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu and sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return max(device_memory_bytes() - mx.get_active_memory(), 0)
