"""The paged decode kernel's launcher: paged_decode() runs cuda_source.PARTIAL over a
batch's partitions of context and MERGE over their results (flash-decoding: the context
is split so that a single sequence still fills the GPU). attention/cuda.py's backend
calls it for every decode step; benchmarks and tools/check_cuda_source.py call it alone.
Its template constants select the code NVRTC builds (~1 s each new combination), so
whatever changes with the context (the partitions' size, a window) is a runtime input.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

import mlx.core as mx

from nanovllm_mlx.attention.cuda_formats import (
    keys_side_by_side,
    pool_template,
    turns_in_kernel,
    vector_loads_default,
)
from nanovllm_mlx.attention.cuda_quantize import no_scales
from nanovllm_mlx.attention.cuda_rows import HEADER
from nanovllm_mlx.attention.cuda_source import MERGE, PARTIAL
from nanovllm_mlx.attention.cuda_write import unwritten
from nanovllm_mlx.attention.kv_quant import KVFormat, turn

WARPS = 4
TARGET_BLOCKS = 512  # enough thread blocks to fill an H100's 132 SMs a few times over
MIN_PARTITION = 32  # tokens; smaller partitions cost more to merge than they save
UNROLL = 2  # keys a warp reads before reducing: two rows in flight instead of one
MAX_GROUP_FLOATS = 32  # query heads a block serves x floats a lane holds per head


@cache
def _kernels() -> tuple[Any, Any]:
    partial = mx.fast.cuda_kernel(
        name="paged_decode_partial",
        input_names=[
            "q",
            "k_pool",
            "v_pool",
            "block_tables",
            "context_lens",
            "scale",
            "params",
            "k_scales",
            "v_scales",
            "after",  # never read: orders the kernel after an in-place write (cuda_write)
        ],
        output_names=["part_out", "part_m", "part_l"],
        source=PARTIAL,
        header=HEADER,
        ensure_row_contiguous=False,  # q is read through its strides; the rest is contiguous
    )
    merge = mx.fast.cuda_kernel(
        name="paged_decode_merge",
        input_names=["part_out", "part_m", "part_l"],
        output_names=["out"],
        source=MERGE,
    )
    return partial, merge


@lru_cache(maxsize=256)
def _scalar(value: float | int, dtype: mx.Dtype) -> mx.array:
    # One device array per distinct value: a fresh mx.array per layer and step would be an
    # upload each time. Created with its data (never lazy), so a compiled step traced on
    # first use captures it as a constant.
    return mx.array([value], dtype=dtype)


@lru_cache(maxsize=256)
def _params(part_size: int, window: int) -> mx.array:
    # Runtime inputs, not template constants: every new value of a template compiles the
    # kernel anew (NVRTC, ~1 s), and the partition size changes with the context. Created
    # with its data, like _scalar, so that a compiled step may capture it.
    return mx.array([part_size, window], dtype=mx.int32)


def heads_per_block(n_heads: int, n_kv: int, head_dim: int, keys: int = 1) -> int:
    """Query heads one thread block serves: the largest divisor of the group size whose
    queries and accumulators still fit in registers (GB x head_dim / (32 / keys) floats
    each, for `keys` read side by side in a warp)."""
    group = n_heads // n_kv
    per_lane = -(-head_dim // (32 // keys))
    fits = [d for d in range(1, group + 1) if group % d == 0 and d * per_lane <= MAX_GROUP_FLOATS]
    return max(fits, default=1)


def num_partitions(
    batch: int, n_blocks: int, max_context: int, target_blocks: int = TARGET_BLOCKS
) -> tuple[int, int]:
    """(partitions per sequence, tokens per partition) for a decode batch whose every
    sequence needs n_blocks thread blocks per partition."""
    wanted = max(1, -(-target_blocks // (batch * n_blocks)))
    parts = max(1, min(wanted, -(-max_context // MIN_PARTITION)))
    size = -(-max_context // parts)
    return -(-max_context // size), size


def paged_decode(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    block_size: int,
    scale: float,
    max_context: int,
    window: int | None = None,
    group: int | None = None,
    unroll: int = UNROLL,
    k_scales: mx.array | None = None,
    v_scales: mx.array | None = None,
    formats: tuple[KVFormat, KVFormat] | None = None,
    after: mx.array | None = None,
    early_values: bool = True,
    vector_loads: bool | None = None,
    target_blocks: int = TARGET_BLOCKS,
    capacity: bool = False,
    keys: int | None = None,
) -> mx.array:
    """q [B, H, D] against each sequence's context_lens[b] keys (its last `window` of
    them for a sliding-window layer) -> [B, H, D]. group (query heads a thread block
    serves; default heads_per_block), unroll, early_values (value rows loaded with the
    keys, not after the scores), vector_loads (default: cuda_formats.vector_loads_default;
    kept only where head_dim is a multiple of 32), keys (read side by side in a warp,
    each over 32 / keys lanes; default cuda_formats.keys_side_by_side; 2 needs vector
    loads) and target_blocks are there for benchmarks to compare.
    formats (KVCache.formats; None: float pools): how K and V are stored, each on its
    own; a quantized pool comes with its scales, dequantized in registers.
    after: the token of an in-place write of these pools (KVCache.written) to run after.
    capacity: max_context is only what the block tables can hold (a compiled step's):
    the partitions' count follows from it, their size from context_lens, on the device."""
    b, n_heads, head_dim = q.shape
    n_kv = k_pool.shape[0]
    k_fmt, v_fmt = formats or (None, None)
    pools = pool_template("K", k_pool, k_scales, k_fmt, head_dim)
    pools += pool_template("V", v_pool, v_scales, v_fmt, head_dim)
    turn_q, turn_out = (f is not None and f.rotate for f in (k_fmt, v_fmt))
    vector = vector_loads_default() if vector_loads is None else vector_loads
    vector = vector and head_dim % 32 == 0
    ks = keys or keys_side_by_side(head_dim, vector)
    if ks != 1 and not (vector and ks == 2 and head_dim % 16 == 0):
        raise ValueError(f"{ks} keys side by side need vector loads (2, head_dim % 16 == 0)")
    inside = turns_in_kernel(head_dim, vector, 32 // ks)
    if not inside:
        q, turn_q = turn(q, turn_q), False
    gb = group or heads_per_block(n_heads, n_kv, head_dim, ks)
    span = max_context if window is None else min(max_context, window)
    parts, size = num_partitions(b, n_heads // gb, span, target_blocks)
    partial, merge = _kernels()
    template = [("T", q.dtype), ("D", head_dim), ("BS", block_size), ("G", n_heads // n_kv)]
    part_out, part_m, part_l = partial(
        inputs=[
            q,
            k_pool,
            v_pool,
            block_tables,
            context_lens,
            _scalar(float(scale), mx.float32),
            _params(0 if capacity else size, window or 0),
            no_scales() if k_scales is None else k_scales,
            no_scales() if v_scales is None else v_scales,
            unwritten() if after is None else after,
        ],
        template=template
        + [("GB", gb), ("U", unroll), ("WARPS", WARPS), ("EV", int(early_values))]
        + [("VL", int(vector)), ("RQ", int(turn_q)), ("KS", ks)]
        + pools,
        grid=(32 * WARPS * parts, n_heads // gb, b),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(b, n_heads, parts, head_dim), (b, n_heads, parts), (b, n_heads, parts)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    out: mx.array
    (out,) = merge(
        inputs=[part_out, part_m, part_l],
        template=[("T", q.dtype), ("D", head_dim), ("RO", int(turn_out and inside))],
        grid=(head_dim, n_heads, b),
        threadgroup=(head_dim, 1, 1),
        output_shapes=[(b, n_heads, head_dim)],
        output_dtypes=[q.dtype],
    )
    return out if inside else turn(out, turn_out)
