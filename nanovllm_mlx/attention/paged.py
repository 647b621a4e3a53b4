"""Paged attention: writes through precomputed pool rows, reads through block tables.

Every op here is lazy; the model runner evaluates the whole step (all layers' cache writes
and the sampled tokens) with one `mx.eval`. Tokens of all sequences in a step are flat
([T, ...], no padding) for the projections; only attention regroups them: decode tokens
(one per sequence) as a [B, 1] batch, prefill chunks as a padded [B, Lq] batch.

Pools are head-major, [n_kv_heads, slots, head_dim]: gathering a sequence's slots gives
each (head, sequence) pair one contiguous [L, head_dim] matrix, which the matmuls read
without a copy (the token-major layout cost 6-8x more on CPU at batch 32, measured in
benchmarks/attention_layouts.py). On CUDA, decode reads the pools directly with the kernel
in cuda_attention.py instead of gathering them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention import cuda as cuda_attention


@dataclass(slots=True)
class KVCache:
    """One layer's K and V pools, [n_kv_heads, num_blocks * block_size, head_dim] each.

    A separate pool per layer, and no other references to it, lets MLX scatter into the
    buffer in place instead of copying it every step.
    """

    k: mx.array
    v: mx.array
    block_size: int


@dataclass(slots=True)
class DecodeGroup:
    """Decode tokens [start, end) whose contexts are read together, padded to the longest
    (gather path). Sequences of similar length are grouped so that little is padding."""

    start: int
    end: int
    rows: mx.array  # pool rows of the sequences' blocks (pool_rows)
    mask: mx.array | None  # [n, 1, L] key visible; None: all
    length: int | None = None  # read only the first `length` keys (a one-sequence group)


@dataclass(slots=True)
class AttentionMetadata:
    """Where each flat token's K/V goes and what each query may see. Flat tokens are ordered
    decode tokens first, then the prefill chunks one sequence after another."""

    write_rows: mx.array  # [T * Hkv] pool row ([Hkv * slots, D] view) of each new K/V row
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_block_tables: mx.array | None = None  # [Bd, nb] (CUDA kernel)
    decode_context_lens: mx.array | None = None  # [Bd] (CUDA kernel)
    decode_max_context: int = 0  # longest context in the decode batch (CUDA kernel)
    decode_groups: list[DecodeGroup] | None = None  # (gather path)
    prefill_q_index: mx.array | None = None  # [Bp, Lq] index into the prefill tokens
    prefill_rows: mx.array | None = None  # [Hkv * Bp * nb] (pool_rows)
    prefill_mask: mx.array | None = None  # [Bp, Lq, L]
    prefill_out_index: mx.array | None = None  # [Tp] index into the flattened [Bp * Lq]


def pool_rows(tables: np.ndarray, n_kv_heads: int, num_blocks: int) -> mx.array:
    """[B, nb] block tables -> the rows that hold those blocks, head by head, in a pool
    viewed as [n_kv_heads * num_blocks, block_size * head_dim]."""
    heads = np.arange(n_kv_heads, dtype=np.int32)[:, None, None] * num_blocks
    return mx.array((heads + tables[None]).reshape(-1).astype(np.int32))


def _read(pool: mx.array, rows: mx.array, batch: int, block_size: int) -> mx.array:
    """Whole blocks, one contiguous row each, which MLX's gather copies with memcpy:
    gathering the same keys slot by slot was 5-6x slower on CPU (0.27 vs 0.06 ms for one
    sequence of 160 keys, 27 vs 4.2 ms for 32 of 512; 12 heads of 64)."""
    n_kv, _, d = pool.shape
    blocks = mx.take(pool.reshape(-1, block_size * d), rows, axis=0)
    return blocks.reshape(n_kv, batch, -1, d)  # [Hkv, B, L, D]


def gathered_attention(
    q: mx.array,
    cache: KVCache,
    rows: mx.array,
    mask: mx.array | None,
    scale: float,
    length: int | None = None,
) -> mx.array:
    """q [B, Lq, H, D] over the keys in the blocks at rows (see pool_rows) where mask
    [B, Lq, L] (None: all of them; length: only the first length) -> [B, Lq, H, D]."""
    b, lq, n_heads, head_dim = q.shape
    n_kv = cache.k.shape[0]
    keys = _read(cache.k, rows, b, cache.block_size)
    values = _read(cache.v, rows, b, cache.block_size)
    if length is not None:
        keys, values = keys[:, :, :length], values[:, :, :length]
    if mx.default_device() != mx.cpu:
        # GPU: the fused kernel never materializes the scores; it reads the strided view.
        o = mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3),
            keys.transpose(1, 0, 2, 3),
            values.transpose(1, 0, 2, 3),
            scale=scale,
            mask=None if mask is None else mask[:, None],
        )
        return o.transpose(0, 2, 1, 3)
    # CPU: batched over (kv head, sequence), query heads of a group stacked as rows.
    g = n_heads // n_kv
    qh = q.reshape(b, lq, n_kv, g, head_dim).transpose(2, 0, 3, 1, 4)
    qh = qh.reshape(n_kv, b, g * lq, head_dim) * scale
    scores = (qh @ keys.swapaxes(-1, -2)).reshape(n_kv, b, g, lq, -1)
    scores = scores.astype(mx.float32)
    if mask is not None:
        scores = mx.where(mask[None, :, None], scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1).astype(values.dtype).reshape(n_kv, b, g * lq, -1)
    o = (probs @ values).reshape(n_kv, b, g, lq, head_dim)
    return o.transpose(1, 3, 0, 2, 4).reshape(b, lq, n_heads, head_dim)


def paged_attention(
    q: mx.array, k: mx.array, v: mx.array, cache: KVCache, meta: AttentionMetadata, scale: float
) -> mx.array:
    """q [T, H, D], k/v [T, Hkv, D] of this step's tokens -> output [T, H * D].

    Writes k/v into the cache first, then reads each sequence's whole context back through
    its block table, so a chunk sees its cached prefix, earlier chunks and itself alike.
    """
    t, n_heads, head_dim = q.shape
    # One Scatter per pool, in place when MLX can donate the buffer, which it does as the
    # pool has no other reference (decode speed does not depend on the pool's size).
    # pool[:, slots] = ... is ten ops per write, and on a GPU each op is host time in a
    # single-stream decode step.
    for name, new in (("k", k), ("v", v)):
        pool = getattr(cache, name)
        flat = pool.reshape(-1, head_dim)
        flat[meta.write_rows] = new.reshape(-1, head_dim)
        setattr(cache, name, flat.reshape(pool.shape))
    outputs = []
    d = meta.num_decode
    if d:
        if meta.decode_block_tables is not None:
            o = cuda_attention.paged_decode(
                q[:d],
                cache.k,
                cache.v,
                meta.decode_block_tables,
                meta.decode_context_lens,
                cache.block_size,
                scale,
                meta.decode_max_context,
            )
        else:
            o = [
                gathered_attention(q[g.start : g.end, None], cache, g.rows, g.mask, scale, g.length)
                for g in meta.decode_groups
            ]
            o = o[0] if len(o) == 1 else mx.concatenate(o, axis=0)
        outputs.append(o.reshape(d, n_heads * head_dim))
    if d < t:
        qp = q[d:]
        bp, lq = meta.prefill_q_index.shape
        qp = qp[meta.prefill_q_index] if bp > 1 else qp[None]
        o = gathered_attention(qp, cache, meta.prefill_rows, meta.prefill_mask, scale)
        o = o.reshape(bp * lq, n_heads * head_dim)
        outputs.append(o[meta.prefill_out_index] if bp > 1 else o)
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
