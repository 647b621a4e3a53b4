"""How the CUDA decode kernel (attention/cuda.py) reads each pool format: the template
constants that select cuda_rows.HEADER's row reader for a float, int8 or int4 pool,
whether a lane loads its values of a row as one word, and whether the kernel turns q and
the output for rows stored turned."""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx

from nanovllm_mlx.attention.kv_quant import KVFormat

# A lane's values of a row consecutive (one vector load) rather than 32 apart. On an H100
# (8B 4-bit, one stream) 122.1 -> 127.7 tok/s after 8k tokens and 78.8 -> 85.8 after 32k
# (v14), 95.8 -> 106.0 after 32k with our 4-bit product (v15); its 48 GPU parity cases
# pass. Quantized pools read that way passed their GPU cases too (v17, with an int8 pool
# 200.2 tok/s after 8k against 199.4-201.8 lane-strided), and are read so by default since
# two keys side by side (below) need it. NANOVLLM_KERNEL_VECTOR_LOADS=0 turns it off.
VECTOR_LOADS = os.environ.get("NANOVLLM_KERNEL_VECTOR_LOADS")


def vector_loads_default() -> bool:
    """Whether the kernel reads pool rows with vector loads (every format alike)."""
    return VECTOR_LOADS != "0"


# Two keys side by side in a warp, each over 16 lanes (cuda_source.PARTIAL's KS): a lane
# loads 16 bytes of a float16 row at head_dim 128 where it loaded 8 (8 of an int8 row
# where it loaded 4), and one shuffle reduces two keys' dot products, 4 rounds instead of
# 5. v12-v17 put the kernel's long-context read at 0.86 TB/s (float16) and an int8 pool's,
# half the bytes, no faster: each warp's chain of loads and reductions, not the bytes.
# NANOVLLM_KERNEL_KEYS=1 reads one key a warp at a time, as before.
KEYS = os.environ.get("NANOVLLM_KERNEL_KEYS", "2")


def keys_side_by_side(head_dim: int, vector_loads: bool) -> int:
    """Keys a warp reads side by side: two where a row's dims split over 16 lanes in a
    power of two of consecutive values each (head_dim 64 or 128, vector loads), else one."""
    fits = vector_loads and head_dim in (64, 128)
    return 2 if KEYS == "2" and fits else 1


# Whether the kernel turns q and the output itself (RQ, RO) for pools stored turned,
# rather than two [D, D] products around it (64 launches a step at Llama 3 8B's 32
# layers). On an H100 (8B 4-bit, one stream, int8 pool; two runs with the products, five
# with the kernel's turns) it took 215.5-220.8 tok/s to 268.2-270.4 after 32 tokens and
# 195.1-196.3 to 199.4-201.8 after 8,192; its 48 GPU cases pass (RESULTS.md v17).
# NANOVLLM_KERNEL_TURNS=0 turns it off.
TURNS_IN_KERNEL = os.environ.get("NANOVLLM_KERNEL_TURNS", "1") != "0"


def turns_in_kernel(head_dim: int, vector_loads: bool, lanes: int = 32) -> bool:
    """Whether paged_turn can turn a row laid out this way: lane-strided always; a
    lane's consecutive dims (vector loads, a row over `lanes` lanes) when there are a
    power of two of them."""
    per_lane = head_dim // lanes
    return TURNS_IN_KERNEL and (not vector_loads or per_lane & (per_lane - 1) == 0)


def pool_template(
    prefix: str, pool: mx.array, scales: mx.array | None, fmt: KVFormat | None, head_dim: int
) -> list[tuple[str, Any]]:
    """The template constants that tell PARTIAL how to read one pool (prefix "K" or "V";
    cuda_rows.HEADER): its element type, code bits (0: float values), whether a bias
    follows the scales, and how many values a scale covers. A pool the kernel cannot read
    is a wiring error (ValueError), never a silent misread."""
    if fmt is None or not fmt.quantized:
        if pool.shape[-1] != head_dim or not mx.issubdtype(pool.dtype, mx.floating):
            raise ValueError(
                f"the CUDA paged kernel reads float pools of width {head_dim}, "
                f"got {pool.dtype} [..., {pool.shape[-1]}]"
            )
        bits, affine, group = 0, False, head_dim
    else:
        codes = mx.int8 if fmt.bits == 8 and not fmt.affine else mx.uint8
        readable = (
            fmt.bits in (4, 8)
            and pool.dtype == codes
            and pool.shape[-1] == fmt.code_width(head_dim)
            and scales is not None
            and scales.dtype == mx.bfloat16
            and scales.shape == (*pool.shape[:-1], fmt.scale_width(head_dim))
        )
        if not readable:
            raise ValueError(
                f"the CUDA paged kernel cannot read this {fmt.name} pool at head_dim "
                f"{head_dim}: codes {pool.dtype} {pool.shape}, scales "
                + ("missing" if scales is None else f"{scales.dtype} {scales.shape}")
            )
        bits, affine, group = fmt.bits, fmt.affine, fmt.group_size(head_dim)
    values = {"T": pool.dtype, "B": bits, "A": affine, "G": group}
    return [(prefix + name, value) for name, value in values.items()]
