"""Paged attention in plain MLX ops: writes through a slot mapping, reads through block tables.

Every op here is lazy; the model runner evaluates the whole step (all layers' cache writes
and the sampled tokens) with one `mx.eval`. Tokens of all sequences in a step are flat
([T, ...], no padding) for the projections; only attention regroups them: decode tokens
(one per sequence) as a [B, 1] batch, prefill chunks as a padded [B, Lq] batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(slots=True)
class KVCache:
    """One layer's K and V pools, [num_blocks * block_size, n_kv_heads, head_dim] each.

    A separate pool per layer, and no other references to it, lets MLX scatter into the
    buffer in place instead of copying it every step.
    """

    k: mx.array
    v: mx.array
    block_size: int


@dataclass(slots=True)
class AttentionMetadata:
    """Where each flat token's K/V goes and what each query may see. Flat tokens are ordered
    decode tokens first, then the prefill chunks one sequence after another."""

    slot_mapping: mx.array  # [T] cache slot of each new token
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_block_tables: mx.array | None = None  # [Bd, nb]
    decode_mask: mx.array | None = None  # [Bd, 1, 1, nb * block_size]
    prefill_q_index: mx.array | None = None  # [Bp, Lq] index into the prefill tokens
    prefill_block_tables: mx.array | None = None  # [Bp, nb]
    prefill_mask: mx.array | None = None  # [Bp, 1, Lq, nb * block_size]
    prefill_out_index: mx.array | None = None  # [Tp] index into the flattened [Bp * Lq]


def _gather(pool: mx.array, block_tables: mx.array, block_size: int) -> mx.array:
    """[B, n_kv_heads, nb * block_size, head_dim] view of each sequence's blocks."""
    slots, heads, dim = pool.shape
    blocks = pool.reshape(slots // block_size, block_size, heads, dim)[block_tables]
    b, nb = block_tables.shape
    return blocks.reshape(b, nb * block_size, heads, dim).transpose(0, 2, 1, 3)


def paged_attention(
    q: mx.array, k: mx.array, v: mx.array, cache: KVCache, meta: AttentionMetadata, scale: float
) -> mx.array:
    """q [T, H, D], k/v [T, Hkv, D] of this step's tokens -> output [T, H * D].

    Writes k/v into the cache first, then reads each sequence's whole context back through
    its block table, so a chunk sees its cached prefix, earlier chunks and itself alike.
    """
    t, n_heads, head_dim = q.shape
    cache.k[meta.slot_mapping] = k
    cache.v[meta.slot_mapping] = v
    outputs = []
    d = meta.num_decode
    if d:
        keys = _gather(cache.k, meta.decode_block_tables, cache.block_size)
        values = _gather(cache.v, meta.decode_block_tables, cache.block_size)
        qd = q[:d, :, None, :]  # [Bd, H, 1, D]
        o = mx.fast.scaled_dot_product_attention(
            qd, keys, values, scale=scale, mask=meta.decode_mask
        )
        outputs.append(o.reshape(d, n_heads * head_dim))
    if d < t:
        qp = q[d:]
        bp, lq = meta.prefill_q_index.shape
        qp = qp[meta.prefill_q_index] if bp > 1 else qp[None]
        keys = _gather(cache.k, meta.prefill_block_tables, cache.block_size)
        values = _gather(cache.v, meta.prefill_block_tables, cache.block_size)
        o = mx.fast.scaled_dot_product_attention(
            qp.transpose(0, 2, 1, 3), keys, values, scale=scale, mask=meta.prefill_mask
        )
        o = o.transpose(0, 2, 1, 3).reshape(bp * lq, n_heads * head_dim)
        outputs.append(o[meta.prefill_out_index] if bp > 1 else o)
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
