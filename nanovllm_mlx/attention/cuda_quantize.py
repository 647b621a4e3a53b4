"""A decode step's new K/V rows quantized and written into the pools in one CUDA kernel.

Quantized pools written through MLX (kv_quant.quantize, then a scatter or a row copy)
cost a decode step some twenty small launches a layer for each of K and V: the float32
cast, the Hadamard product, the group reductions, the scale's rounding, the codes'
rounding and clipping, the nibble packing, the writes. At Llama 3 8B's 32 layers that is
over a thousand launches a step, where a float16 pool's write is one (cuda_write.py): an
int8 pool decoded at 112.5 tok/s after 32 tokens against float16's 152.9 on an H100, with
attention reading next to nothing at that context (RESULTS.md, v12).

This kernel does all of it for one layer in one launch: a warp a row (one token of one
KV head), its lanes holding dims lane + 32 i as the decode kernel reads them. It turns the
row by the Hadamard transform in registers and across lanes (a butterfly, log2 of the
block's size in steps, for kv_quant.hadamard's block-diagonal matrix), reduces each
group's extremes with warp shuffles, rounds the scale (and bias) to bfloat16 outward
exactly as kv_quant.quantize does, then writes the codes from that stored scale. The
sums of the butterfly are ordered differently from MLX's product, so a code may differ by
one where a value falls within rounding of a code's edge; the row's error stays within
its format's step (tests/test_quantized_in_place.py).

Written in place like cuda_write's float rows: the pools are read-only inputs, the kernel
outputs the token that the decode kernel takes to read after it (KVCache.written).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import mlx.core as mx

from nanovllm_mlx.attention.cuda_rows import TURN
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import OUTWARD, KVFormat

HEADER = """
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}

// One row of new values (src, strided) into row `row` of a pool: a float pool's values
// as they are; else codes of BITS bits in groups of GS values (GS = D: the whole row; else
// a multiple of 32), with bfloat16 scales (and biases after them when AFF) into `scales`.
template <int D, int BITS, bool AFF, int GS, bool ROT, typename S, typename P>
__device__ __forceinline__ void put_row(
    const S* src, long stride, P* pool, __nv_bfloat16* scales, long row, int lane) {
  constexpr int PL = (D + 31) / 32;
  float x[PL];
  for (int i = 0; i < PL; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < D ? static_cast<float>(src[d * stride]) : 0.f;
  }
  if constexpr (BITS == 0) {
    for (int i = 0; i < PL; ++i) {
      const int d = lane + 32 * i;
      if (d < D) pool[row * D + d] = static_cast<P>(x[i]);
    }
  } else {
    static_assert(BITS == 8 || BITS == 4, "codes are 8 or 4 bits");
    static_assert(GS == D || GS % 32 == 0, "a group is the row or whole warps' steps");
    constexpr int NG = D / GS, STEPS = GS == D ? PL : GS / 32;
    constexpr int CW = D * BITS / 8, SW = NG * (AFF ? 2 : 1);
    constexpr float TOP = AFF ? float((1 << BITS) - 1) : float((1 << (BITS - 1)) - 1);
    if constexpr (ROT) paged_turn<D, PL, 0>(x, lane);
    float s[NG], b[NG];
    for (int g = 0; g < NG; ++g) {
      float hi = -INFINITY, lo = INFINITY;
      for (int i = g * STEPS; i < (g + 1) * STEPS; ++i) {
        if (lane + 32 * i >= D) continue;
        hi = fmaxf(hi, AFF ? x[i] : fabsf(x[i]));
        lo = fminf(lo, x[i]);
      }
      hi = warp_max(hi);
      lo = -warp_max(-lo);
      // kv_quant.quantize's arithmetic, in its order: each rounded to bfloat16 outward.
      if constexpr (AFF) {
        s[g] = __bfloat162float(__float2bfloat16_rn((hi - lo) / TOP * OUTWARD));
        b[g] = __bfloat162float(__float2bfloat16_rn(lo - fabsf(lo) * (OUTWARD - 1.0f)));
      } else {
        s[g] = __bfloat162float(__float2bfloat16_rn(hi / TOP * OUTWARD));
        b[g] = 0.f;
      }
    }
    for (int i = 0; i < PL; ++i) {
      const int d = lane + 32 * i;
      const int g = GS == D ? 0 : i / STEPS;
      const float step = s[g] == 0.f ? 1.f : s[g];
      const float c = AFF ? fminf(fmaxf(rintf((x[i] - b[g]) / step), 0.f), TOP)
                          : fminf(fmaxf(rintf(x[i] / step), -TOP), TOP);
      if constexpr (BITS == 8) {
        if (d < D) pool[row * CW + d] = static_cast<P>(static_cast<int>(c));
      } else {
        // Two codes a byte, low nibble first: dim d's partner d ^ 1 is the next lane.
        const int nib = static_cast<int>(c) + (AFF ? 0 : 8);
        const int high = __shfl_xor_sync(0xffffffff, nib, 1);
        if (d < D && (lane & 1) == 0) pool[row * CW + d / 2] = static_cast<P>(nib | (high << 4));
      }
    }
    if (lane < NG) {
      float sl = s[0], bl = b[0];
      for (int g = 1; g < NG; ++g)
        if (g == lane) { sl = s[g]; bl = b[g]; }
      scales[row * SW + lane] = __float2bfloat16_rn(sl);
      if constexpr (AFF) scales[row * SW + NG + lane] = __float2bfloat16_rn(bl);
    }
  }
}
"""

# A warp a row, one thread block a (row, pool): grid (32 * rows, 2).
SOURCE = """
    const int lane = threadIdx.x, r = blockIdx.x;
    const int n_kv = k_shape[1];
    const long t = r / n_kv, h = r % n_kv, row = rows[r];
    if (blockIdx.y == 0) {
        put_row<D, KB, KA, KG, KR>(
            k + t * k_strides[0] + h * k_strides[1], k_strides[2],
            const_cast<PK*>(k_pool), const_cast<__nv_bfloat16*>(k_scales), row, lane);
    } else {
        put_row<D, VB, VA, VG, VR>(
            v + t * v_strides[0] + h * v_strides[1], v_strides[2],
            const_cast<PV*>(v_pool), const_cast<__nv_bfloat16*>(v_scales), row, lane);
    }
    if (r == 0 && lane == 0 && blockIdx.y == 0) written[0] = 1;
"""


# kv_quant.OUTWARD as the kernel's float literal (HEADER names it OUTWARD).
OUTWARD_LITERAL = f"{OUTWARD!r}f"


@cache
def _kernel() -> Any:
    return mx.fast.cuda_kernel(
        name="kv_quantize_in_place",
        input_names=["k", "v", "rows", "k_pool", "v_pool", "k_scales", "v_scales"],
        output_names=["written"],
        source=SOURCE,
        header=TURN + HEADER.replace("OUTWARD", OUTWARD_LITERAL),
        ensure_row_contiguous=False,  # as cuda_write's: a copied pool would take the write
    )


@cache
def no_scales() -> mx.array:
    """A float pool's scales input to this kernel and the decode kernel: never read.
    Created with its data, once (a compiled step captures it as a constant)."""
    return mx.array([0], dtype=mx.bfloat16)


def _side(prefix: str, fmt: KVFormat | None, head_dim: int) -> list[tuple[str, Any]]:
    """The template constants of one pool (prefix "K" or "V") for put_row: code bits (0:
    float values), affine, the values a scale covers, turned by the Hadamard transform."""
    if fmt is None or not fmt.quantized:
        values: tuple[int, bool, int, bool] = (0, False, head_dim, False)
    else:
        values = (fmt.bits, fmt.affine, fmt.group_size(head_dim), fmt.rotate)
    return [(prefix + name, value) for name, value in zip("BAGR", values)]


def write_quantizing(cache: KVCache, k: mx.array, v: mx.array, rows: mx.array) -> None:
    """k/v [T, Hkv, D] (any strides) quantized as each pool stores them (KVCache.formats)
    into their rows (PoolLayout.write_rows: [T * Hkv]); the token to read after in
    cache.written."""
    # write_in_place refuses latent caches first; only quantized caches come here.
    assert cache.v is not None and cache.formats is not None
    k_fmt, v_fmt = cache.formats
    n_rows, head_dim = k.shape[0] * k.shape[1], k.shape[2]
    (written,) = _kernel()(
        inputs=[
            k,
            v,
            rows,
            cache.k,
            cache.v,
            no_scales() if cache.k_scales is None else cache.k_scales,
            no_scales() if cache.v_scales is None else cache.v_scales,
        ],
        template=[("D", head_dim), ("PK", cache.k.dtype), ("PV", cache.v.dtype)]
        + _side("K", k_fmt, head_dim)
        + _side("V", v_fmt, head_dim)
        + [("S", k.dtype)],  # names the kernel by the new rows' dtype too (cuda_write)
        grid=(32 * n_rows, 2, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(1,)],
        output_dtypes=[mx.int32],
    )
    cache.written = written
