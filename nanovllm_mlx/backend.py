"""Pick the fastest BLAS before MLX loads, and describe the backend in use.

The Linux `mlx-cpu` wheel links a reference BLAS (~4 GFLOP/s for float32 matmul here).
MLX resolves `cblas_sgemm` at load time, so an OpenBLAS or MKL loaded with RTLD_GLOBAL
*before* `import mlx.core` takes its place (~140 GFLOP/s on the same machine). This module
must therefore be imported before anything imports mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import warnings

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
_blas_threads: list = []  # the loaded BLAS's thread-count setters


def _mkl_paths() -> list[str]:
    # `pip install mkl` puts libmkl_rt into the environment's lib/, which exports plain cblas_*.
    return sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))


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
    global blas_in_use
    if not sys.platform.startswith("linux"):
        return blas_in_use
    if "mlx.core" in sys.modules:
        blas_in_use = "bundled reference BLAS (mlx was imported before nanovllm_mlx)"
        warnings.warn(
            "mlx.core was imported before nanovllm_mlx, so the fast BLAS cannot be loaded: "
            "float32 matmul on CPU will be ~30x slower. Import nanovllm_mlx first.",
            stacklevel=3,
        )
        return blas_in_use
    forced = os.environ.get("NANOVLLM_BLAS", "").strip()
    if forced.lower() == "none":
        blas_in_use = "bundled reference BLAS (NANOVLLM_BLAS=none)"
        return blas_in_use
    paths = [forced] if forced else []
    found = ctypes.util.find_library("openblas")
    paths += _CANDIDATES + ([found] if found else []) + _mkl_paths()
    for path in paths:
        if path.startswith("/") and not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        blas_in_use = path
        _blas_threads.extend(
            getattr(lib, name)
            for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads")
            if hasattr(lib, name)
        )
        return blas_in_use
    blas_in_use = "bundled reference BLAS (slow: install libopenblas0-pthread or `pip install mkl`)"
    return blas_in_use


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
