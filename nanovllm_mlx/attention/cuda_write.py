"""A decode step's new K/V rows written into the pools in place, as a CUDA kernel.

MLX writes into an array in place only when nothing else holds it, and it holds every
array a launched kernel reads until the device has run it; so a step whose pool writes
go through MLX's scatter (KVCache.write) must wait for the step before it to finish
(launch.start), or each write copies its pool whole. That wait exposes the next step's
encoding: on an H100, Llama-3-8B's shape in 4 bits, a compiled step spent 3.7 ms
encoding after the device finished, ~7 ms a token against mlx-lm's ~5.8, which encodes
step n+1 while the device runs step n (benchmarks/step_anatomy.py, RESULTS.md round
three).

This kernel writes the rows straight into the pool's buffer, an input it is given as
read-only, so MLX neither donates nor copies anything and the step may be launched while
the one before it still runs. Two things MLX no longer sees, and how they hold:
- Order within a step: MLX's CUDA graphs order kernels by the buffers they declare, and
  the pool is not declared written. The kernel outputs a one-element token, and the
  decode kernel that reads the pool takes it as an input (KVCache.written), which puts
  the read after the write. Only that kernel may read a pool written this way, so only
  all-decode steps write in place (AttentionMetadata.in_place), on float pools (and on
  quantized ones: cuda_quantize.write_quantizing).
- Order across steps: step n+1's rows come from step n's sampled tokens, so its write
  follows every read of step n; steps are separate graphs on one stream besides.

On an H100 (8B 4-bit, 20 GB pool, one stream) it took decode from 152.9 / 111.2 tok/s
after 32 / 8,192 tokens to 167.7 / 123.6 (mlx-lm: 177.5 / 154.7). tests/
test_in_place_writes.py checks it there: the rows against the scatter's, each read after
its write, engines' tokens. On by default; NANOVLLM_IN_PLACE_WRITES=0 turns it off.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import mlx.core as mx

from nanovllm_mlx.attention.cuda_quantize import write_quantizing
from nanovllm_mlx.attention.kv_cache import KVCache

# One thread per value, one thread block per (row, pool): grid (D * rows, 2); rows on x,
# whose limit is 2^31 blocks (y's is 65,535).
SOURCE = """
    const int d = threadIdx.x, r = blockIdx.x;
    const int n_kv = k_shape[1];
    const long t = r / n_kv, h = r % n_kv;
    const long dst = (long)rows[r] * D + d;
    if (blockIdx.y == 0) {
        const long i = t * k_strides[0] + h * k_strides[1] + d * k_strides[2];
        const_cast<PK*>(k_pool)[dst] = static_cast<PK>(static_cast<float>(k[i]));
    } else {
        const long i = t * v_strides[0] + h * v_strides[1] + d * v_strides[2];
        const_cast<PV*>(v_pool)[dst] = static_cast<PV>(static_cast<float>(v[i]));
    }
    if (r == 0 && d == 0 && blockIdx.y == 0) written[0] = 1;
"""


def enabled() -> bool:
    return os.environ.get("NANOVLLM_IN_PLACE_WRITES", "1") != "0"


def quantized_enabled() -> bool:
    """Quantized pools written in place too: quantized and written by one kernel a layer
    (cuda_quantize.py). On an H100 (8B 4-bit, int8 pool, one stream) it took decode from
    105.7 / 87.9 tok/s after 32 / 8,192 tokens (MLX's quantize and scatter, waiting for
    each step) to 153.1 / 149.5, and its 15 GPU cases passed (tests/
    test_quantized_in_place.py; RESULTS.md, v16). NANOVLLM_QUANTIZED_IN_PLACE=0 turns it
    off (as NANOVLLM_IN_PLACE_WRITES=0 turns off every in-place write)."""
    return enabled() and os.environ.get("NANOVLLM_QUANTIZED_IN_PLACE", "1") != "0"


@cache
def _kernel() -> Any:
    return mx.fast.cuda_kernel(
        name="kv_write_in_place",
        input_names=["k", "v", "rows", "k_pool", "v_pool"],
        output_names=["written"],
        source=SOURCE,
        # Never copy an input: a copied pool would take the write and be thrown away.
        # The new rows are read through their strides; pools are contiguous by
        # construction (kv_cache.make_pool, and every scatter's output).
        ensure_row_contiguous=False,
    )


@cache
def unwritten() -> mx.array:
    """The token of no in-place write: what a read not ordered after one takes, and where
    a chain of writes starts. Created with its data, once (a lazy zeros would be one more
    launch a layer and step, and a compiled step captures it as a constant)."""
    return mx.array([0], dtype=mx.int32)


def write_in_place(cache: KVCache, k: mx.array, v: mx.array, rows: mx.array) -> None:
    """k/v [T, Hkv, D] into the pools' rows (PoolLayout.write_rows: [T * Hkv]), leaving
    the token that orders this layer's reads after the write in cache.written."""
    if cache.v is None:
        raise ValueError("a latent cache is not written in place")
    if cache.quantized:
        write_quantizing(cache, k, v, rows)
        return
    n_rows, head_dim = k.shape[0] * k.shape[1], k.shape[2]
    (written,) = _kernel()(
        inputs=[k, v, rows, cache.k, cache.v],
        # S, the new rows' dtype, is not used by name, but MLX names a compiled kernel by
        # its template alone: without it a float16 k after a float32 one (same pools) would
        # run the float32 one's kernel (tools/check_cuda_source.py checks for this).
        template=[("D", head_dim), ("PK", cache.k.dtype), ("PV", cache.v.dtype), ("S", k.dtype)],
        grid=(head_dim * n_rows, 2, 1),
        threadgroup=(head_dim, 1, 1),
        output_shapes=[(1,)],
        output_dtypes=[mx.int32],
    )
    cache.written = written
