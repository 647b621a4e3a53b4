"""Decode attention read straight from the paged pools, as a CUDA kernel (MLX CUDA builds).

Gathering a batch's blocks into contiguous K/V before SDPA costs more than the attention
itself on a GPU: MLX's gather ran at ~190 GB/s on an H100, so at 128 sequences x 1,024
tokens the gather alone took 1.1 ms a layer against 0.13 ms for SDPA on a dense cache
(benchmarks/attention_layouts.py). This kernel reads each key and value once, in place,
through the block table (flash-decoding: the context is split into partitions so that a
single sequence still fills the GPU, and a second small kernel merges the partitions;
attention/cuda_decode.py launches both).

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
from functools import cache

import mlx.core as mx

from nanovllm_mlx.attention.cuda_decode import paged_decode
from nanovllm_mlx.attention.cuda_write import write_in_place
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.metadata import (
    AttentionMetadata,
    DecodeEntries,
    KVCache,
    PoolLayout,
    block_tables,
)
from nanovllm_mlx.interop import to_mx


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


@dataclass(slots=True)
class DecodePlan:
    block_tables: mx.array  # [Bd, nb]
    context_lens: mx.array  # [Bd]
    max_context: int
    window: int | None = None
    capacity: bool = False  # max_context is the tables' capacity (paged_decode)


class CudaPagedAttention(GatherAttention):
    """Decode through the kernel (cuda_decode.paged_decode); prefill through the gather
    path with fused SDPA.

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
