"""Our CUDA kernels run on the host, for tests on machines without a GPU.

`HostKernel` stands in for `mx.fast.cuda_kernel`: called as MLX's kernel object is, it
compiles the source with g++ the way MLX wraps it (each input's pointer, and its shape
and strides where the source names them; the template constants as constexpr values and
type aliases) and runs the grid: one thread block at a time, its threads as fibers of
one OS thread (each on its own stack), each running until it waits at a barrier
(`__syncthreads` the block's, a warp shuffle its warp's 32 lanes'), then the next in turn;
`__shared__` arrays static (shared by the block's threads). A barrier that some thread
never reaches fails the run (a hang on a GPU). As std::threads, one a GPU thread meeting at
std::barriers, the runs spent their time in the kernel waking one another:
tests/test_cuda_kernel_host.py took 166 s here (75 of them system time), with fibers 49 s
(its 44 runs 103 s -> 5 s; the rest is g++). Outputs come back as MLX arrays.
Inputs are passed as contiguous copies with their strides, which a kernel that reads
through strides cannot tell apart; a kernel writing into an input (cuda_write's) writes
the copy, which `inputs_after` returns. Compute types: float32 and float16; bfloat16 only
where a kernel converts it explicitly (scales, and the pair arithmetic the prelude
emulates: __hfma2 and __hsub2 on half and bfloat16 pairs). Each compiled source is
cached for the session.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

C_TYPES = {
    mx.int8: "int8_t",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
    mx.uint8: "uint8_t",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
}

PRELUDE = """
// Fibers switch stacks by _longjmp: no system call, where swapcontext makes one to save the
// signal mask (the runs took 37 s against 5). The checked longjmp takes that for a bug.
#undef _FORTIFY_SOURCE
#if defined(__APPLE__)
#define _XOPEN_SOURCE 700  // macOS declares the ucontext functions only with it
#endif
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <setjmp.h>
#include <ucontext.h>
#include <vector>
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__ static
using std::max;
using std::min;
using __half = _Float16;
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // to nearest, ties to even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return {uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __half2float(__half x) { return float(x); }
inline __half __float2half_rn(float f) { return __half(f); }
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct float2 { float x, y; };
// Pair arithmetic as the device does it: the product exact in float32, one rounding to
// the pair's type (the float32 sum's own rounding aside).
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return {__half(float(a.x) * float(b.x) + float(c.x)),
          __half(float(a.y) * float(b.y) + float(c.y))};
}
inline __half2 __hsub2(__half2 a, __half2 b) {
  return {__half(float(a.x) - float(b.x)), __half(float(a.y) - float(b.y))};
}
inline float2 __half22float2(__half2 a) { return {float(a.x), float(a.y)}; }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  auto one = [](__nv_bfloat16 p, __nv_bfloat16 q, __nv_bfloat16 r) {
    return __float2bfloat16_rn(__bfloat162float(p) * __bfloat162float(q) + __bfloat162float(r));
  };
  return {one(a.x, b.x, c.x), one(a.y, b.y, c.y)};
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__float2bfloat16_rn(__bfloat162float(a.x) - __bfloat162float(b.x)),
          __float2bfloat16_rn(__bfloat162float(a.y) - __bfloat162float(b.y))};
}
inline float2 __bfloat1622float2(__nv_bfloat162 a) {
  return {__bfloat162float(a.x), __bfloat162float(a.y)};
}
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t both = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((both >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct dim3 { unsigned x, y, z; };
using Shape = std::array<int32_t, 10>;
using Strides = std::array<int64_t, 10>;
// The running fiber's: set by run_grid before it resumes one.
static dim3 threadIdx, blockIdx;
static dim3 gridDim, blockDim;
// A GPU thread is a fiber of this one OS thread. It runs until it waits at a barrier, then
// hands back to run_grid, which resumes the next thread that can go on (the barrier it
// waits at has opened since: every thread of it has arrived).
struct Barrier { int expected = 0, arrived = 0; unsigned opened = 0; };
struct Fiber {
  ucontext_t start;  // its first entry, on its own stack
  jmp_buf resume;  // where it waits
  dim3 idx;
  int warp = 0, lane = 0;
  bool started = false, done = false;
  const Barrier* waits = nullptr;  // and how often it had opened when this one arrived
  unsigned opened = 0;
};
static std::vector<Fiber> fibers;
static int current;
static jmp_buf grid_jump;
static Barrier block_barrier;
static std::vector<Barrier> warp_barriers;
static std::function<void()> fiber_body;
inline void arrive_and_wait(Barrier& b) {
  if (++b.arrived == b.expected) {  // the last: the others go on when resumed
    b.arrived = 0;
    ++b.opened;
    return;
  }
  Fiber& self = fibers[current];
  self.waits = &b;
  self.opened = b.opened;
  if (!_setjmp(self.resume)) _longjmp(grid_jump, 1);
}
inline void __syncthreads() { arrive_and_wait(block_barrier); }
template <typename T> T* warp_slots(int warp) {
  static std::vector<std::array<T, 32>> slots(64);
  return slots[warp].data();
}
template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) {
  const int warp = fibers[current].warp, lane = fibers[current].lane;
  T* slots = warp_slots<T>(warp);
  slots[lane] = v;
  arrive_and_wait(warp_barriers[warp]);
  const T other = slots[lane ^ mask];
  arrive_and_wait(warp_barriers[warp]);  // before any lane writes its next value
  return other;
}
static void fiber_entry() {
  fiber_body();
  fibers[current].done = true;
  _longjmp(grid_jump, 1);  // never returns: its stack is the next block's thread's
}
// Every block in turn, its threads (fibers) resumed in order until all have returned.
static void run_grid(const std::function<void()>& body) {
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const size_t stack = 256 << 10;  // a kernel's locals: registers on a GPU (a few KB)
  static std::vector<char*> stacks;
  while ((int)stacks.size() < threads) stacks.push_back(static_cast<char*>(std::malloc(stack)));
  fiber_body = body;
  fibers.assign(threads, Fiber{});
  block_barrier = {threads};
  warp_barriers.assign((threads + 31) / 32, Barrier{});
  for (int w = 0; w < (int)warp_barriers.size(); ++w)
    warp_barriers[w].expected = std::min(32, threads - 32 * w);
  for (unsigned bz = 0; bz < gridDim.z; ++bz)
  for (unsigned by = 0; by < gridDim.y; ++by)
  for (unsigned bx = 0; bx < gridDim.x; ++bx) {
    blockIdx = {bx, by, bz};
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      f = Fiber{};
      f.idx = {unsigned(t % blockDim.x), unsigned(t / blockDim.x % blockDim.y),
               unsigned(t / (blockDim.x * blockDim.y))};
      f.warp = t / 32;
      f.lane = t % 32;
      getcontext(&f.start);
      f.start.uc_stack.ss_sp = stacks[t];
      f.start.uc_stack.ss_size = stack;
      f.start.uc_link = nullptr;
      makecontext(&f.start, fiber_entry, 0);
    }
    for (int left = threads; left > 0;) {
      bool moved = false;
      for (int t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        if (f.done || (f.waits != nullptr && f.waits->opened == f.opened)) continue;
        f.waits = nullptr;
        current = t;
        threadIdx = f.idx;
        if (!_setjmp(grid_jump)) {  // back here when it waits or returns
          if (f.started) _longjmp(f.resume, 1);
          f.started = true;
          setcontext(&f.start);
        }
        moved = true;
        left -= f.done;
      }
      if (!moved) {  // every thread left waits at a barrier that cannot open
        std::printf("block (%u, %u, %u): %d threads wait forever\\n", bx, by, bz, left);
        std::exit(1);
      }
    }
  }
}
static std::vector<char> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  std::fseek(f, 0, SEEK_END);
  std::vector<char> data(std::ftell(f) + 16);
  std::fseek(f, 0, SEEK_SET);
  std::fread(data.data(), 1, data.size() - 16, f);
  std::fclose(f);
  return data;
}
"""

_BUILT: dict[str, Path] = {}
_DIR = Path(tempfile.mkdtemp(prefix="cuda_host_"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
FLAGS = ["-std=c++20", "-O1", "-w"]


@functools.cache
def _prelude() -> Path:
    """PRELUDE as the header every program includes (g++ -include), precompiled once a
    session (2 s): a program took 1.4 s to build, most of it parsing the standard headers,
    0.65 s with them precompiled. g++ uses prelude.h.gch beside it where built with the
    same flags, else reads prelude.h itself, so a program builds the same either way."""
    header = _DIR / "prelude.h"
    header.write_text(PRELUDE)
    cmd = ["g++", *FLAGS, "-x", "c++-header", str(header), "-o", f"{header}.gch"]
    subprocess.run(cmd, capture_output=True)
    return header


def _literal(values: tuple[int, ...], kind: str) -> str:
    return f"{kind}{{{{{', '.join(str(v) for v in values)}}}}}"


class HostKernel:
    """mx.fast.cuda_kernel(...) for the host: see the module's docstring."""

    def __init__(self, **kernel: Any) -> None:
        self.kernel = kernel
        # The last call's inputs as the kernel left them (bfloat16 as uint16): what an
        # in-place write wrote.
        self.inputs_after: list[np.ndarray] = []

    def __call__(self, **call: Any) -> list[mx.array]:
        # numpy has no bfloat16: its bits travel as uint16, typed by the dtypes in the source.
        inputs = [
            np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))
            for a in call["inputs"]
        ]
        outputs = list(zip(call["output_shapes"], call["output_dtypes"]))
        binary = self._build(self._program(call, inputs))
        paths = []
        for i, array in enumerate(inputs):
            path = _DIR / f"in{i}_{id(self)}"
            array.tofile(path)
            paths.append(str(path))
        out_paths = [str(_DIR / f"out{j}_{id(self)}") for j in range(len(outputs))]
        run = subprocess.run([str(binary), *paths, *out_paths], capture_output=True, text=True)
        assert run.returncode == 0 and not run.stdout, run.stdout + run.stderr
        self.inputs_after = [
            np.fromfile(path, dtype=array.dtype).reshape(array.shape)
            for path, array in zip(paths, inputs)
        ]
        results = []
        for path, (shape, dtype) in zip(out_paths, outputs):
            if dtype == mx.bfloat16:  # its bits, as the inputs travel
                bits = np.fromfile(path, dtype=np.uint16).reshape(shape)
                results.append(mx.array(bits).view(mx.bfloat16))
                continue
            raw = np.fromfile(path, dtype=np.dtype(str(dtype).removeprefix("mlx.core.")))
            results.append(mx.array(raw.reshape(shape)))
        return results

    def _program(self, call: dict[str, Any], inputs: list[np.ndarray]) -> str:
        """The kernel as MLX wraps it (kernel_body), and a main that reads the inputs from
        the files named on its command line, runs the grid and writes the outputs; after
        PRELUDE (_build includes it)."""
        k = self.kernel
        source: str = k["source"]
        params, args = [], []
        for i, (name, array, raw) in enumerate(zip(k["input_names"], inputs, call["inputs"])):
            c_type = C_TYPES[raw.dtype]
            params.append(f"const {c_type}* {name}")
            args.append(f"reinterpret_cast<const {c_type}*>(in{i}.data())")
            if f"{name}_shape" in source:
                params.append(f"const Shape {name}_shape")
                args.append(_literal(tuple(array.shape) or (1,), "Shape"))
            if f"{name}_strides" in source:
                params.append(f"const Strides {name}_strides")
                strides = tuple(s // array.itemsize for s in array.strides) or (1,)
                args.append(_literal(strides, "Strides"))
        outputs = list(zip(k["output_names"], call["output_shapes"], call["output_dtypes"]))
        for j, (name, _, dtype) in enumerate(outputs):
            params.append(f"{C_TYPES[dtype]}* {name}")
            args.append(f"reinterpret_cast<{C_TYPES[dtype]}*>(out{j}.data())")
        constants = ""
        for key, value in call.get("template", []):
            if isinstance(value, bool):
                constants += f"  constexpr bool {key} = {'true' if value else 'false'};\n"
            elif isinstance(value, int):
                constants += f"  constexpr int {key} = {value};\n"
            else:
                constants += f"  using {key} = {C_TYPES[value]};\n"
        group = call["threadgroup"]
        blocks = [g // t for g, t in zip(call["grid"], group)]
        main = "int main(int argc, char** argv) {\n"
        for i in range(len(inputs)):
            main += f"  std::vector<char> in{i} = read_file(argv[{i + 1}]);\n"
        for j, (_, shape, dtype) in enumerate(outputs):
            size = int(np.prod(shape)) * dtype.size
            main += f"  std::vector<char> out{j}({size} + 16, 0);\n"
        main += f"""
  gridDim = {{{blocks[0]}u, {blocks[1]}u, {blocks[2]}u}};
  blockDim = {{{group[0]}u, {group[1]}u, {group[2]}u}};
  run_grid([&] {{ kernel_body({", ".join(args)}); }});
"""
        for i in range(len(inputs)):  # a kernel may write an input (in place): keep that
            main += (
                f'  {{ FILE* f = std::fopen(argv[{i + 1}], "wb"); '
                f"std::fwrite(in{i}.data(), 1, in{i}.size() - 16, f); std::fclose(f); }}\n"
            )
        for j in range(len(outputs)):
            main += (
                f'  {{ FILE* f = std::fopen(argv[{len(inputs) + 1 + j}], "wb"); '
                f"std::fwrite(out{j}.data(), 1, out{j}.size() - 16, f); std::fclose(f); }}\n"
            )
        main += "  return 0;\n}\n"
        text = k.get("header", "") + "\nvoid kernel_body(" + ", ".join(params)
        return text + ") {\n" + constants + source + "\n}\n" + main

    @staticmethod
    def _build(text: str) -> Path:
        key = hashlib.sha1(text.encode()).hexdigest()[:16]
        if key not in _BUILT:
            src, binary = _DIR / f"{key}.cpp", _DIR / key
            src.write_text(text)
            cmd = ["g++", *FLAGS, "-include", str(_prelude()), "-o", str(binary), str(src)]
            build = subprocess.run(cmd, capture_output=True, text=True)
            assert build.returncode == 0, build.stderr[-4000:]
            _BUILT[key] = binary
        return _BUILT[key]


@contextlib.contextmanager
def on_the_host(monkeypatch: pytest.MonkeyPatch, *kernels: Callable[[], Any]) -> Iterator[None]:
    """Inside, mx.fast.cuda_kernel is HostKernel, and `kernels` (the engine's cached
    kernel builders, such as cuda_write._kernel) build theirs anew, as HostKernels; they
    are cleared again on the way out, so no later test meets a host kernel."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", HostKernel, raising=False)
    for kernel in kernels:
        kernel.cache_clear()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for kernel in kernels:
            kernel.cache_clear()  # type: ignore[attr-defined]
