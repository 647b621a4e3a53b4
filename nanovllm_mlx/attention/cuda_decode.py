"""The paged decode kernel's launcher: paged_decode() runs cuda_source.PARTIAL over a
batch's partitions of context and MERGE over their results (flash-decoding: the context
is split so that a single sequence still fills the GPU). attention/cuda.py's backend
calls it for every decode step; benchmarks and tools/check_cuda_source.py call it alone.
Its template constants select the code NVRTC builds (~1 s each new combination), so
whatever changes with the context (the partitions' size, a window) is a runtime input.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, NamedTuple

import mlx.core as mx

from nanovllm_mlx.attention import cuda_formats
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


class _PoolKey(NamedTuple):
    dtype: mx.Dtype
    shape: tuple[int, ...]
    scales: tuple[mx.Dtype, tuple[int, ...]] | None
    fmt: KVFormat | None


def _pool_key(pool: mx.array, scales: mx.array | None, fmt: KVFormat | None) -> _PoolKey:
    scales_key = None if scales is None else (scales.dtype, tuple(scales.shape))
    return _PoolKey(pool.dtype, tuple(pool.shape), scales_key, fmt)


class _LayoutKey(NamedTuple):
    q_dtype: mx.Dtype
    n_heads: int
    head_dim: int
    block_size: int
    k: _PoolKey
    v: _PoolKey
    vector: bool
    keys: int | None
    group: int | None
    unroll: int
    early_values: bool
    switches: tuple[str, bool]


@dataclass(frozen=True, slots=True)
class _Layout:
    template: list[tuple[str, Any]]  # PARTIAL's
    merge_template: list[tuple[str, Any]]
    group: int  # query heads a thread block serves
    turn_q_outside: bool  # rows stored turned, q turned by a product before the kernel
    turn_out_outside: bool  # ... and the output after it


_LAYOUTS: dict[_LayoutKey, _Layout] = {}


def _layout(
    key: _LayoutKey,
    k_pool: mx.array,
    v_pool: mx.array,
    k_scales: mx.array | None,
    v_scales: mx.array | None,
) -> _Layout:
    """The launch's template constants and choices, which depend only on shapes, dtypes,
    formats and switches: worked out once for each and kept. Every layer of every eager
    step asks; kept, a launch with its kernels stubbed took 29 us of host time against 45
    on this 2-core CPU, and GPT-2's 12 layers 0.56 ms a step against 0.75 at 256
    sequences (RESULTS.md v21)."""
    if (layout := _LAYOUTS.get(key)) is not None:
        return layout
    head_dim, n_heads = key.head_dim, key.n_heads
    n_kv = key.k.shape[0]
    pools = pool_template("K", k_pool, k_scales, key.k.fmt, head_dim)
    pools += pool_template("V", v_pool, v_scales, key.v.fmt, head_dim)
    turn_q, turn_out = (f is not None and f.rotate for f in (key.k.fmt, key.v.fmt))
    vector = key.vector and head_dim % 32 == 0
    ks = key.keys or keys_side_by_side(head_dim, vector)
    if ks != 1 and not (vector and ks == 2 and head_dim % 16 == 0):
        raise ValueError(f"{ks} keys side by side need vector loads (2, head_dim % 16 == 0)")
    inside = turns_in_kernel(head_dim, vector, 32 // ks)
    gb = key.group or heads_per_block(n_heads, n_kv, head_dim, ks)
    template = [("T", key.q_dtype), ("D", head_dim), ("BS", key.block_size)]
    template += [("G", n_heads // n_kv), ("GB", gb), ("U", key.unroll), ("WARPS", WARPS)]
    template += [("EV", int(key.early_values)), ("VL", int(vector))]
    template += [("RQ", int(turn_q and inside)), ("KS", ks)] + pools
    merge_template = [("T", key.q_dtype), ("D", head_dim), ("RO", int(turn_out and inside))]
    layout = _Layout(template, merge_template, gb, turn_q and not inside, turn_out and not inside)
    _LAYOUTS[key] = layout
    return layout


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
    k_fmt, v_fmt = formats or (None, None)
    vector = vector_loads_default() if vector_loads is None else vector_loads
    layout = _layout(
        _LayoutKey(
            q.dtype,
            n_heads,
            head_dim,
            block_size,
            _pool_key(k_pool, k_scales, k_fmt),
            _pool_key(v_pool, v_scales, v_fmt),
            vector,
            keys,
            group,
            unroll,
            early_values,
            # Module switches that tests set (the environment's, read at import).
            (cuda_formats.KEYS, cuda_formats.TURNS_IN_KERNEL),
        ),
        k_pool,
        v_pool,
        k_scales,
        v_scales,
    )
    if layout.turn_q_outside:
        q = turn(q, True)
    span = max_context if window is None else min(max_context, window)
    parts, size = num_partitions(b, n_heads // layout.group, span, target_blocks)
    partial, merge = _kernels()
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
        template=layout.template,
        grid=(32 * WARPS * parts, n_heads // layout.group, b),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(b, n_heads, parts, head_dim), (b, n_heads, parts), (b, n_heads, parts)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    out: mx.array
    (out,) = merge(
        inputs=[part_out, part_m, part_l],
        template=layout.merge_template,
        grid=(head_dim, n_heads, b),
        threadgroup=(head_dim, 1, 1),
        output_shapes=[(b, n_heads, head_dim)],
        output_dtypes=[q.dtype],
    )
    return turn(out, True) if layout.turn_out_outside else out
