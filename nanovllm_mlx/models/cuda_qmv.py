"""A 4-bit quantized linear layer's product for a few rows (one decoding sequence, or a
small batch) as our own CUDA kernel, reading each weight once.

On an H100 (Llama 3 8B's shape, 4 bits, group 64, float16) MLX's own one-row kernel took
5.7 ms of a 6.8 ms decode step: 225 launches reading ~4.15 GB, ~0.73 TB/s of the
device's ~3.35 (benchmarks/logs/h100_llama3_8b_q4_v10_anatomy.log). mlx-lm pays the same,
so the weights' reads set both engines' single-stream speed. Its kernel gives each lane
16 values (8 bytes) of a row per load and keeps its sums in the compute dtype; this one
gives a lane 32 values (a 16-byte load) of each of R rows at once, so a warp has R times
more bytes in flight, and turns codes into half-precision pairs with integer operations:
(code | 0x6400) is the float16 1024 + code, minus 1024 exact (0x4300, 128, for
bfloat16). Each row's sum is kept as sum(x * code) * scale + sum(x) * bias, the codes'
products in pairs of the compute dtype over at most 32 values, the rest in float32.

For several rows of x (a decode batch) the weights stay in registers while each row of x
is read (from L1: every warp of a block reads the same x); MLX's CUDA build runs its
one-row kernel for up to 7 rows (a row per grid slice, each reading the weights again) and
a tiled matmul with tensor cores from 8 (for groups narrower than the row, as in every
mlx-community checkpoint: its Hopper matmul wants one group a row).

Measured on an H100 (benchmarks/logs/h100_*_v14_*.log): one stream of the 8B shape
decoded at 192.2 / 165.3 tok/s after 32 / 8,192 tokens with it and 166.1 / 123.4
without; side by side with mlx-lm, 1.22x / 1.18x / 1.06x after 32 / 2k / 8k tokens. By
rows (benchmarks/qmm_rows.py, a layer's seven products): 2 / 3 / 4 rows 1.65x / 2.18x /
2.53x MLX's time, 8 rows 0.51x (MLX's tiled matmul has tensor cores), hence ROUTED_ROWS.
Teacher-forced logprobs of its decode differ from MLX's prefill by 0.015-0.023 on average
where MLX's own decode differs by 0.008-0.013 (benchmarks/qmv_logprobs.py).

Checked on the host against MLX's quantized matmul (tests/test_cuda_qmv.py, through
tests/cuda_host.py) and on the GPU by the same tests.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.cuda import on_gpu

# Integer tricks shared by the float16 and bfloat16 paths: a pair of 16-bit values is a
# uint32 here, and only three operations know its type (fma2, sub2, sum2).
HEADER = """
template <typename To, typename From>
__device__ __forceinline__ To qmv_bits(From f) {  // registers renamed, no code (NVRTC has
  static_assert(sizeof(To) == sizeof(From), "a pair is 4 bytes");  // no memcpy builtin)
  return *reinterpret_cast<const To*>(&f);
}
__device__ __forceinline__ float qmv_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float qmv_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void qmv_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void qmv_store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}
// The code c in a pair's low bits, OR this, is 1024 + c (float16) or 128 + c (bfloat16).
__device__ __forceinline__ uint32_t qmv_magic(__half) { return 0x64006400u; }
__device__ __forceinline__ uint32_t qmv_magic(__nv_bfloat16) { return 0x43004300u; }
__device__ __forceinline__ uint32_t qmv_fma2(uint32_t a, uint32_t b, uint32_t c, __half) {
  return qmv_bits<uint32_t>(
      __hfma2(qmv_bits<__half2>(a), qmv_bits<__half2>(b), qmv_bits<__half2>(c)));
}
__device__ __forceinline__ uint32_t qmv_fma2(
    uint32_t a, uint32_t b, uint32_t c, __nv_bfloat16) {
  return qmv_bits<uint32_t>(__hfma2(
      qmv_bits<__nv_bfloat162>(a), qmv_bits<__nv_bfloat162>(b), qmv_bits<__nv_bfloat162>(c)));
}
__device__ __forceinline__ uint32_t qmv_sub2(uint32_t a, uint32_t b, __half) {
  return qmv_bits<uint32_t>(__hsub2(qmv_bits<__half2>(a), qmv_bits<__half2>(b)));
}
__device__ __forceinline__ uint32_t qmv_sub2(uint32_t a, uint32_t b, __nv_bfloat16) {
  return qmv_bits<uint32_t>(
      __hsub2(qmv_bits<__nv_bfloat162>(a), qmv_bits<__nv_bfloat162>(b)));
}
__device__ __forceinline__ float qmv_sum2(uint32_t a, __half) {
  const float2 f = __half22float2(qmv_bits<__half2>(a));
  return f.x + f.y;
}
__device__ __forceinline__ float qmv_sum2(uint32_t a, __nv_bfloat16) {
  const float2 f = __bfloat1622float2(qmv_bits<__nv_bfloat162>(a));
  return f.x + f.y;
}
"""

# A warp per R rows of the weight (output features), a lane per 32 input features of a
# step (one uint4 of codes per row); the x rows are read as four uint4 each. Pair k of a
# code word holds codes k and k + 4 (MLX packs code i at bits 4i), so x's values are
# paired alike with byte permutes. bfloat16 keeps 8 bits of precision: its pairs are
# summed into float32 after every word (4 products), float16's after a step's 16.
SOURCE = """
    constexpr uint32_t LOW4 = 0x000F000Fu;
    const T tag{};
    const uint32_t magic = qmv_magic(tag);
    const int lane = threadIdx.x & 31;
    const long row0 = ((long)blockIdx.x * WARPS + (threadIdx.x >> 5)) * R;
    const int n_out = w_shape[0];
    const int k_in = x_shape[1];
    if (row0 >= n_out) return;
    const int steps = k_in / 32, groups = k_in / G;
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    float acc[R][M];
    #pragma unroll
    for (int r = 0; r < R; ++r)
      #pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
    for (int c0 = lane; c0 < steps; c0 += 32 * U) {
      // Every load of U steps first (U x R x 16 bytes of codes in flight a lane), then
      // the arithmetic; a step past the row reads the row's last one and is not counted.
      uint4 codes[U][R];
      float scale[U][R], bias[U][R];
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = min(c0 + 32 * u, steps - 1);
        #pragma unroll
        for (int r = 0; r < R; ++r) {
          const long n = row0 + r < n_out ? row0 + r : n_out - 1;
          codes[u][r] = w4[n * steps + c];
          scale[u][r] = qmv_float(scales[n * groups + c * 32 / G]);
          bias[u][r] = qmv_float(biases[n * groups + c * 32 / G]);
        }
      }
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (c >= steps) break;
        #pragma unroll
        for (int m = 0; m < M; ++m) {
          uint32_t xw[16];
          #pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint4 v = x4[((long)m * k_in + c * 32) / 8 + i];
            xw[4 * i] = v.x; xw[4 * i + 1] = v.y; xw[4 * i + 2] = v.z; xw[4 * i + 3] = v.w;
          }
          uint32_t xp[16];  // pair 4j + k: x[8j + k], x[8j + k + 4]
          float xsum = 0.0f;
          #pragma unroll
          for (int j = 0; j < 4; ++j) {
            xp[4 * j] = __byte_perm(xw[4 * j], xw[4 * j + 2], 0x5410);
            xp[4 * j + 1] = __byte_perm(xw[4 * j], xw[4 * j + 2], 0x7632);
            xp[4 * j + 2] = __byte_perm(xw[4 * j + 1], xw[4 * j + 3], 0x5410);
            xp[4 * j + 3] = __byte_perm(xw[4 * j + 1], xw[4 * j + 3], 0x7632);
            #pragma unroll
            for (int i = 0; i < 4; ++i) xsum += qmv_sum2(xw[4 * j + i], tag);
          }
          #pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint4 cw = codes[u][r];
            const uint32_t words[4] = {cw.x, cw.y, cw.z, cw.w};
            float dot = 0.0f;
            uint32_t pair = 0u;
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
              #pragma unroll
              for (int k = 0; k < 4; ++k) {
                const uint32_t q =
                    qmv_sub2(((words[j] >> (4 * k)) & LOW4) | magic, magic, tag);
                pair = qmv_fma2(xp[4 * j + k], q, pair, tag);
              }
              if (FLUSH_WORDS == 1 || j == 3) {
                dot += qmv_sum2(pair, tag);
                pair = 0u;
              }
            }
            acc[r][m] += scale[u][r] * dot + bias[u][r] * xsum;
          }
        }
      }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r)
      #pragma unroll
      for (int m = 0; m < M; ++m) {
        float v = acc[r][m];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0 && row0 + r < n_out) qmv_store(out + (long)m * n_out + row0 + r, v);
      }
"""

WARPS = 4
STEPS_IN_FLIGHT = 2  # U: a lane's 16-byte steps loaded before any is multiplied
ROWS_PER_WARP = 0  # R for every layer where set (benchmarks); 0: rows_per_warp's choice
MAX_ROWS = 8  # rows of x a launch takes: the M template constant (registers grow with it)
# Rows of x the layers send here: 4 rows took 0.21 ms a layer against MLX's 0.52, 8 rows
# 0.30 against 0.15 (H100, benchmarks/logs/h100_qmm_rows_v14.log). 5-7 are unmeasured:
# MLX runs them as it runs 2-4 (its one-row kernel, weights read again per row), and ours
# at 8 rows already beats MLX's at 3 (0.40).
ROUTED_ROWS = 7


def rows_per_warp(n_out: int) -> int:
    """Weight rows a warp reads together: four where that still leaves thousands of
    warps (an H100 has 132 SMs of up to 64 warps each), fewer for narrow layers (Llama 3
    8B's k/v projections: 1,024 rows). These (with STEPS_IN_FLIGHT 2) are what the engine
    was measured with. Each product alone, one row, four rows a warp with one step in
    flight was the fastest on every shape of the 8B layer: its seven products in 0.123
    ms against 0.137 with these and 0.173 with MLX's; the k/v products took 0.010 ms
    against MLX's 0.007 either way. Not yet measured in the engine."""
    if n_out >= 8192:
        return 4
    return 2 if n_out >= 4096 else 1


@cache
def _kernel() -> Any:
    return mx.fast.cuda_kernel(
        name="qmv_rows",
        input_names=["x", "w", "scales", "biases"],
        output_names=["out"],
        source=SOURCE,
        header=HEADER,
    )


def supports(x: mx.array, w: mx.array, scales: mx.array, bits: int, group_size: int) -> bool:
    """Whether qmv() computes this product: affine 4-bit codes, groups of 32/64/128, a
    float16 or bfloat16 x with as many rows as MAX_ROWS at most, scales of x's dtype."""
    k_in = x.shape[-1]
    return (
        bits == 4
        and group_size in (32, 64, 128)
        and w.ndim == 2
        and x.dtype in (mx.float16, mx.bfloat16)
        and scales.dtype == x.dtype
        and k_in % 32 == 0
        and w.shape[1] * 8 == k_in
        and x.size // max(k_in, 1) <= MAX_ROWS
    )


def qmv(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int = 64,
    rows: int | None = None,
    kernel: Any = None,
    in_flight: int | None = None,
) -> mx.array:
    """x @ dequantize(w).T for x [..., K] with at most MAX_ROWS rows, w [N, K / 8] uint32
    (MLX's affine 4-bit layout), scales and biases [N, K / group_size]: [..., N] in x's
    dtype. rows: weight rows a warp takes (rows_per_warp by default); in_flight: steps a
    lane loads at once (STEPS_IN_FLIGHT by default); kernel: a stand-in for the compiled
    kernel (tests run it on the host)."""
    lead, k_in = x.shape[:-1], x.shape[-1]
    n_rows = x.size // k_in
    n_out = w.shape[0]
    r = rows or ROWS_PER_WARP or rows_per_warp(n_out)
    warps_needed = -(-n_out // r)
    blocks = -(-warps_needed // WARPS)
    (out,) = (kernel or _kernel())(
        inputs=[x.reshape(n_rows, k_in), w, scales, biases],
        template=[
            ("T", x.dtype),
            ("G", group_size),
            ("R", r),
            ("M", n_rows),
            ("WARPS", WARPS),
            ("U", in_flight or STEPS_IN_FLIGHT),
            ("FLUSH_WORDS", 4 if x.dtype == mx.float16 else 1),
        ],
        grid=(32 * WARPS * blocks, 1, 1),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(n_rows, n_out)],
        output_dtypes=[x.dtype],
    )
    return out.reshape(*lead, n_out)


class FewRowsQuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer, whose products of up to ROUTED_ROWS rows take qmv()
    (decode steps); longer ones (prefill) MLX's own matmul."""

    def __call__(self, x: mx.array) -> mx.array:
        if not routed(x, self):
            return super().__call__(x)
        y = qmv(x, self["weight"], self["scales"], self["biases"], self.group_size)
        return y + self["bias"] if "bias" in self else y


class FewRowsQuantizedEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding whose use as the output layer (tied weights: as_linear)
    takes qmv() for up to ROUTED_ROWS rows; lookups are MLX's."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not routed(x, self):
            return super().as_linear(x)
        return qmv(x, self["weight"], self["scales"], self["biases"], self.group_size)


def enabled() -> bool:
    """On an MLX CUDA build running on its GPU, unless NANOVLLM_CUDA_QMV=0."""
    return os.environ.get("NANOVLLM_CUDA_QMV", "1") != "0" and on_gpu()


def routed(x: mx.array, layer: nn.Module) -> bool:
    """Whether a layer's product with x takes qmv(): ROUTED_ROWS rows at most (decode
    steps of up to that many sequences; prefill and larger batches stay MLX's)."""
    rows = x.size // max(x.shape[-1], 1)
    return 0 < rows <= ROUTED_ROWS and supports(
        x, layer["weight"], layer["scales"], layer.bits, layer.group_size
    )


ADOPTED = {
    nn.QuantizedLinear: FewRowsQuantizedLinear,
    nn.QuantizedEmbedding: FewRowsQuantizedEmbedding,
}


def adopt(model: nn.Module) -> int:
    """Give qmv() the few-row products of every affine 4-bit linear layer (and tied
    output layer) it can compute: MLX's own classes exactly, so tensor-parallel shards
    and experts keep theirs; returns how many layers. The layers keep their arrays: only
    the class changes, so nothing is re-initialised or copied."""
    count = 0
    for _, module in model.named_modules():
        few_rows = ADOPTED.get(type(module))
        if (
            few_rows is not None
            and module.mode == "affine"
            and module.bits == 4
            and module.group_size in (32, 64, 128)
            and "biases" in module
        ):
            module.__class__ = few_rows
            count += 1
    return count
