"""Compile the CUDA paged decode kernel (attention/cuda_source.py) with nvcc, wrapped the
way MLX's mx.fast.cuda_kernel wraps it, for each combination of template constants the
engine launches it with: a syntax or type error shows here, on a machine without a GPU,
instead of in GPU time.

    python3 tools/check_cuda_source.py            # every combination (a few minutes)
    python3 tools/check_cuda_source.py --quick    # one shape, every K/V format pair
    python3 tools/check_cuda_source.py --keep DIR # also keep the wrapped .cu files there

The combinations come from the launcher itself: attention/cuda_decode.py's paged_decode runs on
the CPU against recording stand-ins for mx.fast.cuda_kernel, so the source, the template
constants and the input dtypes compiled are the ones it would launch with. The wrapper
follows mlx/backend/cuda/custom_kernel.cpp (build_kernel): `__global__ void name(const T*
input, const __grid_constant__ Shape input_shape, ..., out*)` with the template constants
as `constexpr int X = ...;` / `using T = ...;`; MLX's device header is stubbed (Shape and
Strides are fixed-size arrays). NVRTC compiles the real thing on the GPU machine with
--device-as-default-execution-space for the device's sm_XXa; here nvcc -cubin for sm_90a
(H100), printing ptxas's registers and spills for each kernel. Launches sharing a header
are compiled as one file, the header once and each kernel after it as its own entry
function (the headers nvcc parses took 2.3 s of each kernel's 2.6 s); a file that fails is
compiled again a kernel a file, for each one's own errors. Also checks that no two
launches share MLX's kernel name (name + template values) with different sources: MLX
would run the first one's compiled kernel for both. Exits 1 if anything fails.

The in-place K/V write kernels (attention/cuda_write.py, cuda_quantize.py) are compiled
alongside. With --nvrtc LIB --mlx-include DIR the sources are compiled as the GPU machine
compiles them: by NVRTC itself (LIB: libnvrtc.so.13, e.g. from `pip download
nvidia-cuda-nvrtc==13.0.*`), with MLX's own device headers (DIR holds
mlx/backend/cuda/device/, e.g. `git archive` of ml-explore/mlx at the installed version)
and the flags MLX's jit_module.cpp passes,
instead of nvcc and the stub header.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# isort: off
import nanovllm_mlx  # noqa: E402, F401  (before mlx: the fast BLAS)
import mlx.core as mx  # noqa: E402

# isort: on
from nanovllm_mlx.attention import cuda_decode, cuda_quantize, cuda_write  # noqa: E402
from nanovllm_mlx.attention.kv_cache import KVCache  # noqa: E402
from nanovllm_mlx.attention.kv_quant import INT4, INT8, KVFormat, resolve  # noqa: E402
from nanovllm_mlx.models import cuda_qmv  # noqa: E402

CUDA_TYPES = {
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
}

# What MLX's mlx/backend/cuda/device/utils.cuh gives a custom kernel, as far as ours use it.
STUB_HEADER = """#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cstdint>
#define MAX_NDIM 10
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}  // namespace mlx::core::cu
"""

DEFAULT_HEADER = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as MLX would compile it: its kernel name and wrapped source, and
    what it was called with."""

    name: str
    source: str
    template: tuple[tuple[str, Any], ...]
    input_names: tuple[str, ...]
    inputs: tuple[mx.array, ...] = field(compare=False, repr=False)
    # The start of source before the kernel itself: MLX's includes and the kernel's header,
    # the same for all its launches (compile_batch puts them in one file after it).
    header: str = field(default="", compare=False, repr=False)


def _template_hash(template: list[tuple[str, Any]]) -> str:
    parts = []
    for _, value in template:
        if isinstance(value, bool):
            parts.append("_t" if value else "_f")
        elif isinstance(value, int):
            parts.append(f"_{value}")
        else:
            parts.append("_" + str(value).removeprefix("mlx.core."))
    return "".join(parts)


def wrap(
    name: str,
    header: str,
    source: str,
    input_names: list[str],
    inputs: list[mx.array],
    output_names: list[str],
    output_dtypes: list[mx.Dtype],
    template: list[tuple[str, Any]],
) -> str:
    """The source MLX's build_kernel makes of a custom kernel (custom_kernel.cpp)."""
    text = DEFAULT_HEADER + header
    text += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {name}(\n"
    for input_name, array in zip(input_names, inputs):
        text += f"    const {CUDA_TYPES[array.dtype]}* {input_name},\n"
        if array.ndim > 0:
            for suffix, kind in (("shape", "Shape"), ("strides", "Strides")):
                if f"{input_name}_{suffix}" in source:
                    text += f"    const __grid_constant__ {kind} {input_name}_{suffix},\n"
            if f"{input_name}_ndim" in source:
                text += f"    const __grid_constant__ int {input_name}_ndim,\n"
    outputs = [f"    {CUDA_TYPES[d]}* {n}" for n, d in zip(output_names, output_dtypes)]
    text += ",\n".join(outputs) + ") {\n"
    for key, value in template:
        if isinstance(value, bool):
            text += f"  constexpr bool {key} = {'true' if value else 'false'};\n"
        elif isinstance(value, int):
            text += f"  constexpr int {key} = {value};\n"
        else:
            text += f"  using {key} = {CUDA_TYPES[value]};\n"
    text += "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"
    return text


class _Recorder:
    """Stands in for one mx.fast.cuda_kernel: records each call as a Launch and returns
    zeros of the output shapes, so the launcher runs on through to its result."""

    def __init__(self, sink: list[Launch], **kernel: Any) -> None:
        self.sink, self.kernel = sink, kernel

    def __call__(self, **call: Any) -> list[mx.array]:
        k = self.kernel
        template = list(call.get("template", []))
        name = "custom_kernel_" + k["name"] + _template_hash(template)
        source = wrap(
            name,
            k.get("header", ""),
            k["source"],
            k["input_names"],
            call["inputs"],
            k["output_names"],
            call["output_dtypes"],
            template,
        )
        names, inputs = tuple(k["input_names"]), tuple(call["inputs"])
        header = DEFAULT_HEADER + k.get("header", "")
        self.sink.append(Launch(name, source, tuple(template), names, inputs, header))
        return [mx.zeros(s, dtype=d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside, attention/cuda_decode.py's kernels record their launches into the list yielded
    instead of running (any device, no GPU needed)."""
    launches: list[Launch] = []
    original = mx.fast.cuda_kernel
    mx.fast.cuda_kernel = lambda **kernel: _Recorder(launches, **kernel)
    cuda_decode._kernels.cache_clear()
    cuda_write._kernel.cache_clear()
    cuda_quantize._kernel.cache_clear()
    cuda_qmv._kernel.cache_clear()
    try:
        yield launches
    finally:
        mx.fast.cuda_kernel = original
        cuda_decode._kernels.cache_clear()
        cuda_write._kernel.cache_clear()
        cuda_quantize._kernel.cache_clear()
        cuda_qmv._kernel.cache_clear()


def launch_qmv(dtype: mx.Dtype, rows: int, group_size: int, per_warp: int, u: int) -> None:
    """cuda_qmv.qmv of `rows` rows through a 4-bit [64, 256] weight (records)."""
    w = mx.zeros((64, 256 // 8), dtype=mx.uint32)
    scales = mx.zeros((64, 256 // group_size), dtype=dtype)
    x = mx.zeros((rows, 256), dtype=dtype)
    cuda_qmv.qmv(x, w, scales, scales, group_size, per_warp, in_flight=u)


def launch_decode(
    dtype: mx.Dtype,
    shape: tuple[int, int, int],
    formats: tuple[KVFormat, KVFormat],
    block_size: int = 16,
    unroll: int = cuda_decode.UNROLL,
    window: int | None = None,
    vector: bool = False,
) -> mx.array:
    """paged_decode over a small cache of these formats (inside recording(): records)."""
    n_heads, n_kv, head_dim = shape
    cache = KVCache.allocate(formats, n_kv, 4 * block_size, head_dim, block_size)
    return cuda_decode.paged_decode(
        mx.zeros((2, n_heads, head_dim), dtype=dtype),
        cache.k,
        cache.v,  # type: ignore[arg-type]
        mx.zeros((2, 4), dtype=mx.int32),
        mx.array([3, 4 * block_size], dtype=mx.int32),
        block_size,
        head_dim**-0.5,
        4 * block_size,
        window,
        unroll=unroll,
        k_scales=cache.k_scales,
        v_scales=cache.v_scales,
        formats=formats,
        vector_loads=vector,
    )


def launch_write(pool_dtype: mx.Dtype, new_dtype: mx.Dtype, head_dim: int) -> None:
    """cuda_write.write_in_place of three tokens' rows (inside recording(): records)."""
    k_pool, v_pool = (mx.zeros((2, 64, head_dim), dtype=pool_dtype) for _ in range(2))
    cache = KVCache(k_pool, v_pool, 16)
    new = mx.zeros((3, 2, head_dim), dtype=new_dtype)
    cuda_write.write_in_place(cache, new, new, mx.zeros((6,), dtype=mx.int32))


def launch_quantized_write(formats: tuple[KVFormat, KVFormat], dtype: mx.Dtype, d: int) -> None:
    """cuda_write.write_in_place into pools of these formats (inside recording(): records)."""
    cache = KVCache.allocate(formats, 2, 64, d, 16)
    new = mx.zeros((3, 2, d), dtype=dtype)
    cuda_write.write_in_place(cache, new, new, mx.zeros((6,), dtype=mx.int32))


DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# Llama 3, no grouping, 16 to 1, Gemma 3's 256-wide heads, a group of 3, head_dim 80 (not
# a multiple of 32: lanes past the row) and 96 (int4's group of 64 does not divide it).
SHAPES = [(32, 8, 128), (12, 12, 64), (16, 1, 128), (4, 1, 256), (9, 3, 64), (7, 7, 80)]
SHAPES += [(8, 2, 96), (4, 2, 16)]
TINY = [(INT8, INT8), (INT4, INT8), (resolve("auto", mx.float32), INT4)]


def _pairs(dtype: mx.Dtype) -> list[tuple[KVFormat, KVFormat]]:
    auto = resolve("auto", dtype)
    other = resolve("float16" if dtype == mx.bfloat16 else "bfloat16", dtype)
    return [
        (auto, auto),
        (INT8, INT8),
        (INT4, INT4),
        (INT8, auto),
        (auto, INT4),
        (INT4, INT8),
        (INT8, INT4),
        (other, INT8),  # a float pool in another dtype than the compute
    ]


# The other layouts kv_quant.py's KVFormat describes (tests/test_kv_quant.py's FORMATS).
EXTRA = [
    KVFormat("s4", bits=4),
    KVFormat("a8", bits=8, group=64, affine=True),
    KVFormat("s8", bits=8, group=32),
]


def combinations(quick: bool) -> list[dict[str, Any]]:
    """The launches to compile: quick, one shape with every format pair in half
    precision, and the pairs the GPU tests run through an engine; else every shape,
    dtype and pair, the unrolls and block sizes the tests use, and the other KVFormat
    layouts; each with a lane's values 32 apart and consecutive (vector loads). Quick
    reads rows as the engine does by default (vector loads where head_dim allows, lanes
    32 apart where not: head_dim 16 and 80 below), and lanes 32 apart at head_dim 128 for
    one pair whose scales cover 32 lanes or more (the code NANOVLLM_KERNEL_VECTOR_LOADS=0
    selects): the suite's nvcc check, 27 of the decode kernel's launches where both
    ways of every combination made 42."""
    if quick:
        lanes = {"dtype": mx.float16, "shape": (32, 8, 128), "formats": (INT8, INT4)}
        return [{**c, "vector": True} for c in _combinations(quick)] + [{**lanes, "vector": False}]
    return [{**c, "vector": v} for c in _combinations(quick) for v in (False, True)]


def _combinations(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [
            {"dtype": d, "shape": (32, 8, 128), "formats": p}
            for d in (mx.float16, mx.bfloat16)
            for p in _pairs(d)
        ] + [
            {"dtype": mx.float16, "shape": (7, 7, 80), "formats": (INT4, INT8)},
            # tests/test_cuda_kv_quant.py's engine runs (llama-tiny: float32, head_dim 16)
            *({"dtype": mx.float32, "shape": (4, 2, 16), "formats": p} for p in TINY),
        ]
    combos = [
        {"dtype": d, "shape": s, "formats": p}
        for d, s in itertools.product(DTYPES, SHAPES)
        for p in _pairs(d)
    ]
    for d, u, bs in itertools.product(DTYPES, (1, 3), (8, 32)):
        combos.append(
            {
                "dtype": d,
                "shape": (32, 8, 128),
                "formats": (INT8, INT4),
                "unroll": u,
                "block_size": bs,
            }
        )
    for f, s in itertools.product(EXTRA, SHAPES):
        combos.append({"dtype": mx.float16, "shape": s, "formats": (f, INT8)})
        combos.append({"dtype": mx.bfloat16, "shape": s, "formats": (INT4, f)})
    return combos


def collect(quick: bool) -> list[Launch]:
    """Every distinct launch of the combinations; raises on a kernel-name clash."""
    with recording() as launches:
        for combo in combinations(quick):
            launch_decode(**combo)
        for pool_dtype, new_dtype in itertools.product(DTYPES, DTYPES):
            for head_dim in (128,) if quick else (16, 64, 80, 128, 256):
                launch_write(pool_dtype, new_dtype, head_dim)
        for dtype in DTYPES:
            for formats in _pairs(dtype)[1:]:
                launch_quantized_write(formats, dtype, 128)
        # Quick: the rows and steps in flight the engine launches at the extremes (one row,
        # MAX_ROWS: the most registers), every weight-rows-a-warp choice.
        rows_set = (1, cuda_qmv.MAX_ROWS) if quick else (1, 2, cuda_qmv.MAX_ROWS)
        steps = (cuda_qmv.STEPS_IN_FLIGHT,) if quick else (1, 2)
        for dtype, rows, per_warp, u in itertools.product(
            (mx.float16, mx.bfloat16), rows_set, (1, 2, 4), steps
        ):
            for group_size in (64,) if quick else (32, 64, 128):
                launch_qmv(dtype, rows, group_size, per_warp, u)
        if not quick:
            for (_, _, d), f in itertools.product(SHAPES, [*EXTRA, INT8, INT4]):
                launch_quantized_write((f, INT8), mx.float16, d)
                launch_quantized_write((INT4, f), mx.bfloat16, d)
    by_name: dict[str, Launch] = {}
    for launch in launches:
        seen = by_name.setdefault(launch.name, launch)
        if seen.source != launch.source:
            raise SystemExit(
                f"two launches share MLX's kernel name {launch.name} with different sources: "
                "MLX would run the first one's compiled kernel for both (a template constant "
                "is missing)"
            )
    return list(by_name.values())


def _nvcc(path: Path, workdir: Path, nvcc: str, arch: str) -> subprocess.CompletedProcess[str]:
    """nvcc -cubin of one file, ptxas reporting each entry function's resources. -cubin:
    device code only, as NVRTC compiles it (a quarter of -c's time, no host pass)."""
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-std=c++17", "--resource-usage"]
    cmd += ["-I", str(workdir / "stub"), "-o", str(path.with_suffix(".cubin")), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True)


def _usage(name: str, report: str) -> str:
    """name: its registers (and spills) from ptxas's report of its entry function."""
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    usage = f"{regs.group(1) if regs else '?'} registers"
    if spill and spill.group(1) != "0":
        usage += f", {spill.group(1)} bytes SPILLED"
    return f"{name}: {usage}"


def compile_one(launch: Launch, workdir: Path, nvcc: str, arch: str) -> tuple[bool, str]:
    """(compiled, ptxas's registers and spills) or (False, nvcc's errors)."""
    path = workdir / f"{launch.name}.cu"
    path.write_text(launch.source)
    done = _nvcc(path, workdir, nvcc, arch)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        return False, f"{launch.name} {dict(launch.template)}:\n{out}"
    return True, _usage(launch.name, out)


def compile_batch(
    launches: list[Launch], workdir: Path, nvcc: str, arch: str
) -> list[tuple[bool, str]]:
    """compile_one's result for each of launches (sharing one header), from one nvcc run
    over a file of the header and every kernel after it: the same kernels, each its own
    entry function under its own name, and the header's includes parsed once. If the
    file fails, each launch alone (its own errors, and the others' results)."""
    header = launches[0].header
    assert all(x.header == header and x.source.startswith(header) for x in launches)
    for launch in launches:  # each launch's file too, as MLX compiles it (for --keep)
        (workdir / f"{launch.name}.cu").write_text(launch.source)
    path = workdir / f"batch_{launches[0].name}.cu"
    path.write_text(header + "".join(x.source[len(header) :] for x in launches))
    done = _nvcc(path, workdir, nvcc, arch)
    if done.returncode != 0:
        return [compile_one(x, workdir, nvcc, arch) for x in launches]
    # ptxas reports entry function by entry function, each by its mangled name:
    # mlx::core::cu::NAME(...) is _ZN3mlx4core2cu<len(NAME)>NAMEE...
    reports: dict[str, str] = {}
    for part in (done.stdout + done.stderr).split("Compiling entry function '")[1:]:
        reports[part[: part.index("'")]] = part
    results = []
    for launch in launches:
        prefix = f"_ZN3mlx4core2cu{len(launch.name)}{launch.name}E"
        found = [report for mangled, report in reports.items() if mangled.startswith(prefix)]
        if len(found) != 1:
            results.append((False, f"{launch.name}: {len(found)} ptxas reports (one expected)"))
            continue
        results.append((True, _usage(launch.name, found[0])))
    return results


def batches(launches: list[Launch], jobs: int) -> list[list[Launch]]:
    """The launches by header, each header's split into files of a few kernels where the
    jobs outnumber the headers (a file a job at a time; each file parses its includes)."""
    by_header: dict[str, list[Launch]] = {}
    for launch in launches:
        by_header.setdefault(launch.header, []).append(launch)
    size = max(8, -(-len(launches) // jobs))
    files = [same[i : i + size] for same in by_header.values() for i in range(0, len(same), size)]
    return sorted(files, key=len, reverse=True)  # the longest first: jobs end together


def compile_nvrtc(launch: Launch, nvrtc: ctypes.CDLL, include: Path, arch: str) -> tuple[bool, str]:
    """(compiled, "") or (False, NVRTC's log): the source compiled as MLX compiles it on
    the GPU machine (jit_module.cpp's flags, its real device headers)."""
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))  # as MLX looks
    flags = [
        "--device-as-default-execution-space",
        f"--gpu-architecture={arch}",
        f"--include-path={include}",
        f"--include-path={cuda_include / 'include'}",
        f"--include-path={cuda_include / 'include' / 'cccl'}",
    ]
    prog = ctypes.c_void_p()
    src, name = launch.source.encode(), launch.name.encode()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None) != 0:
        return False, f"{launch.name}: nvrtcCreateProgram failed"
    argv = (ctypes.c_char_p * len(flags))(*(f.encode() for f in flags))
    result = nvrtc.nvrtcCompileProgram(prog, len(flags), argv)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    if result != 0:
        return False, f"{launch.name} {dict(launch.template)}:\n{log.value.decode()}"
    return True, f"{launch.name}: compiled by NVRTC"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, every format pair")
    parser.add_argument("--keep", type=Path, help="write the wrapped .cu files here")
    parser.add_argument("--arch", default="sm_90a", help="nvcc -arch (default sm_90a: H100)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--nvrtc", help="libnvrtc.so to compile with, as the GPU machine does")
    parser.add_argument("--mlx-include", type=Path, help="with --nvrtc: MLX's source root")
    args = parser.parse_args()
    if args.nvrtc:
        if args.mlx_include is None:
            parser.error("--nvrtc needs --mlx-include (MLX's device headers)")
        with mx.stream(mx.cpu):
            launches = collect(args.quick)
        nvrtc = ctypes.CDLL(args.nvrtc)
        results = [compile_nvrtc(x, nvrtc, args.mlx_include, args.arch) for x in launches]
        for ok, text in results:
            if not ok:
                print(text)
        failed = sum(not ok for ok, _ in results)
        print(f"{len(results) - failed}/{len(results)} kernels compiled (NVRTC, {args.arch})")
        return 1 if failed else 0
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: install the CUDA toolkit to check the kernel sources")
        return 2
    with mx.stream(mx.cpu):
        launches = collect(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        stub = workdir / "stub" / "mlx" / "backend" / "cuda" / "device"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "utils.cuh").write_text(STUB_HEADER)
        files = batches(launches, args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            done = pool.map(lambda x: compile_batch(x, workdir, nvcc, args.arch), files)
            results = [result for batch in done for result in batch]
    for _, text in sorted(results, key=lambda r: r[0]):
        print(text)
    failed = sum(not ok for ok, _ in results)
    print(f"{len(results) - failed}/{len(results)} kernels compiled ({args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
