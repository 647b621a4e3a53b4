"""Decode attention read straight from the paged pools, as a CUDA kernel (MLX CUDA builds).

Gathering a batch's blocks into contiguous K/V before SDPA costs more than the attention
itself on a GPU: MLX's gather ran at ~190 GB/s on an H100, so at 128 sequences x 1,024
tokens the gather alone took 1.1 ms a layer against 0.13 ms for SDPA on a dense cache
(benchmarks/attention_layouts.py). This kernel reads each key and value once, in place,
through the block table (flash-decoding: the context is split into partitions so that a
single sequence still fills the GPU, and a second small kernel merges the partitions).

A quantized pool (--kv-cache-dtype int8/int4) is read as stored: the kernel dequantizes
each row's codes in registers with its bfloat16 scales (attention/kv_quant.py's formats),
so a decode step reads half (int8) or about a quarter (int4) of float16's bytes. Rows
stored turned by the Hadamard transform stay turned: the kernel turns q as it loads it
and the merge turns the output back (cuda_rows.TURN; cuda_formats.turns_in_kernel),
where the gather path takes two [D, D] products a layer (attend.py), as this launcher
does with NANOVLLM_KERNEL_TURNS=0.

Prefill, and every other backend (CPU, Metal), use the pure-MLX gather path
(attention/gather.py), which the CPU test suite exercises, and so do models with attention
sinks (gpt-oss): the kernel has no sink term and no GPU was at hand to test one.
tests/test_attention.py checks this kernel against the gather path on CUDA, and
tests/test_cuda_kv_quant.py over quantized pools; tools/check_cuda_source.py compiles every
launch's source with nvcc on a machine without a GPU.
NANOVLLM_PAGED_KERNEL=0 turns the kernel off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
from nanovllm_mlx.attention.cuda_write import unwritten, write_in_place
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.kv_quant import KVFormat, turn
from nanovllm_mlx.attention.metadata import (
    AttentionMetadata,
    DecodeEntries,
    KVCache,
    PoolLayout,
    block_tables,
)
from nanovllm_mlx.interop import to_mx

WARPS = 4
TARGET_BLOCKS = 512  # enough thread blocks to fill an H100's 132 SMs a few times over
MIN_PARTITION = 32  # tokens; smaller partitions cost more to merge than they save
UNROLL = 2  # keys a warp reads before reducing: two rows in flight instead of one
MAX_GROUP_FLOATS = 32  # query heads a block serves x floats a lane holds per head


def on_gpu() -> bool:
    """An MLX CUDA build running on its GPU."""
    try:
        return bool(mx.cuda.is_available()) and mx.default_device() == mx.gpu
    except AttributeError:
        return False


@cache
def available() -> bool:
    """True when decode should use the kernel: on_gpu, unless NANOVLLM_PAGED_KERNEL=0."""
    return os.environ.get("NANOVLLM_PAGED_KERNEL", "1") != "0" and on_gpu()


def reads_quantized() -> bool:
    """Whether quantized pools take the kernel rather than the gather path (which gathers
    and dequantizes every key every step): an int8 pool decoded at 112.5 / 95.6 tok/s
    after 32 / 8,192 tokens that way on an H100 (8B 4-bit), at 61.3 / 37.7 gathered.
    NANOVLLM_KV_QUANT_KERNEL=0 turns it off."""
    return os.environ.get("NANOVLLM_KV_QUANT_KERNEL", "1") != "0"


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


@dataclass(slots=True)
class DecodePlan:
    block_tables: mx.array  # [Bd, nb]
    context_lens: mx.array  # [Bd]
    max_context: int
    window: int | None = None
    capacity: bool = False  # max_context is the tables' capacity (paged_decode)


class CudaPagedAttention(GatherAttention):
    """Decode through the kernel above; prefill through the gather path with fused SDPA.

    An eager step's plan knows its longest context and its window; a compiled step's
    (plan_decode_uniform) is two arrays whose shapes alone set everything, as a trace must."""

    name = "cuda-paged"

    def __init__(self, in_place: bool = False, chunk_buckets: bool = False) -> None:
        super().__init__(fused=True, chunk_buckets=chunk_buckets)
        self.writes_in_place = in_place

    def write(
        self, cache: KVCache, k: mx.array, v: mx.array | None, meta: AttentionMetadata
    ) -> None:
        if meta.in_place:
            assert v is not None  # select_backend: latent caches take the gather path
            write_in_place(cache, k, v, meta.write_rows)
        else:
            super().write(cache, k, v, meta)

    def reads_in_place(self, entries: DecodeEntries, pool: PoolLayout) -> bool:
        return False  # the kernel reads every step in place, compiled or not

    # Its decode plans are its own, not the gather path's: each backend's plans are opaque
    # to everything but itself, so these overrides narrow what GatherAttention declares.
    def plan_decode(  # type: ignore[override]
        self, entries: DecodeEntries, pool: PoolLayout, window: int | None = None
    ) -> DecodePlan:
        max_context = int(entries.context_lens.max())
        tables = block_tables(entries.block_tables, pool.num_table_blocks(max_context))
        return DecodePlan(to_mx(tables), to_mx(entries.context_lens), max_context, window)

    def plan_decode_uniform(
        self, entries: DecodeEntries, pool: PoolLayout, width: int
    ) -> dict[str, mx.array]:
        tables = block_tables(entries.block_tables, width)
        return {"tables": to_mx(tables), "context": to_mx(entries.context_lens)}

    def decode(  # type: ignore[override]
        self,
        q: mx.array,
        cache: KVCache,
        plan: DecodePlan | dict[str, mx.array],
        scale: float,
        sinks: mx.array | None = None,
    ) -> mx.array:
        if sinks is not None:
            # The kernel has no sink term; select_backend gives models with sinks the
            # gather path instead, so reaching this is a wiring error, not a user's.
            raise NotImplementedError("the CUDA paged decode kernel has no attention sinks")
        if isinstance(plan, dict):
            # A trace knows the tables' capacity alone (a power-of-two width: up to twice
            # the longest context): the partitions' count follows from it, their size
            # from the contexts, on the device (capacity=True), so none sits empty.
            tables = plan["tables"]
            capacity = tables.shape[1] * cache.block_size
            plan = DecodePlan(tables, plan["context"], capacity, capacity=True)
        if cache.v is None:
            # select_backend routes models with latent caches to the gather path.
            raise ValueError("the CUDA paged kernel does not read latent (MLA) caches")
        return paged_decode(
            q,
            cache.k,
            cache.v,
            plan.block_tables,
            plan.context_lens,
            cache.block_size,
            scale,
            plan.max_context,
            plan.window,
            k_scales=cache.k_scales,
            v_scales=cache.v_scales,
            formats=cache.formats,
            after=cache.written,
            capacity=plan.capacity,
        )
