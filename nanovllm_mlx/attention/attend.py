"""Attention over K/V read from the paged pools, the math every pure-MLX path shares:
whole blocks gathered (gathered_attention) or, for one sequence whose keys sit in
consecutive blocks, a strided slice of the pools read in place (sliced_attention).
attention/gather.py plans which one a step uses."""

from __future__ import annotations

import mlx.core as mx

from nanovllm_mlx.attention.kv_quant import turn
from nanovllm_mlx.attention.metadata import KVCache


def gathered_attention(
    q: mx.array,
    cache: KVCache,
    rows: mx.array,
    mask: mx.array | None,
    scale: float,
    length: int | None = None,
    fused: bool = False,
    causal: bool = False,
    sinks: mx.array | None = None,
) -> mx.array:
    """q [B, Lq, H, D] over the keys in the blocks at rows (PoolLayout.block_rows) where
    mask [B, Lq, L] (None: all of them; length: only the first length) -> [B, Lq, H, Dv]
    (Dv: D, or a latent cache's value_dim).
    fused: MLX's SDPA kernel (GPUs); otherwise two batched matmuls (CPU). causal (fused,
    no mask): the queries are the last Lq of the `length` keys, each seeing those up to
    its own, which SDPA's causal mode does without a mask array. sinks [H]: attention
    sinks (gpt-oss), one learned logit per query head added to the softmax's denominator
    alone, so a query may put weight on no key at all."""
    b = q.shape[0]
    # A quantized pool is dequantized here, only the blocks gathered, in q's dtype; rows
    # stored turned stay turned, and q (keys) and the output (values) are turned instead.
    turn_k, turn_v = cache.rotated
    keys = cache.read_blocks(0, rows, b, q.dtype, rotated=True)
    values = cache.values_of(keys, lambda: cache.read_blocks(1, rows, b, q.dtype, rotated=True))
    o = _attend(turn(q, turn_k), keys, values, mask, scale, length, fused, causal, sinks)
    return turn(o, turn_v)


def _attend(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    mask: mx.array | None,
    scale: float,
    length: int | None,
    fused: bool,
    causal: bool,
    sinks: mx.array | None,
) -> mx.array:
    """gathered_attention over keys/values [Hkv, B, L, D] already read."""
    b, lq, n_heads, head_dim = q.shape
    n_kv = keys.shape[0]
    v_dim = values.shape[-1]  # head_dim, or a latent cache's value_dim
    if length is not None:
        keys, values = keys[:, :, :length], values[:, :, :length]
    if fused:
        # The fused kernel never materializes the scores; it reads the strided view.
        o = mx.fast.scaled_dot_product_attention(
            q.transpose(0, 2, 1, 3),
            keys.transpose(1, 0, 2, 3),
            values.transpose(1, 0, 2, 3),
            scale=scale,
            mask="causal" if causal else None if mask is None else mask[:, None],
            sinks=sinks,
        )
        return o.transpose(0, 2, 1, 3)
    # Batched over (kv head, sequence), query heads of a group stacked as rows.
    g = n_heads // n_kv
    qh = q.reshape(b, lq, n_kv, g, head_dim).transpose(2, 0, 3, 1, 4)
    qh = qh.reshape(n_kv, b, g * lq, head_dim) * scale
    scores = (qh @ keys.swapaxes(-1, -2)).reshape(n_kv, b, g, lq, -1)
    scores = scores.astype(mx.float32)
    if mask is not None:
        scores = mx.where(mask[None, :, None], scores, -mx.inf)
    if sinks is None:
        probs = mx.softmax(scores, axis=-1)
    else:
        # exp(s - log(sum exp(s) + exp(sink))): the softmax over the keys and the sink, the
        # sink's own share dropped; a row with every key masked gets weight 0 everywhere.
        sink = sinks.astype(mx.float32).reshape(n_kv, 1, g, 1, 1)
        probs = mx.exp(scores - mx.logaddexp(mx.logsumexp(scores, axis=-1, keepdims=True), sink))
    probs = probs.astype(values.dtype).reshape(n_kv, b, g * lq, -1)
    o = (probs @ values).reshape(n_kv, b, g, lq, v_dim)
    return o.transpose(1, 3, 0, 2, 4).reshape(b, lq, n_heads, v_dim)


def sliced_attention(
    q: mx.array,
    cache: KVCache,
    offset: int,
    length: int | None,
    scale: float,
    sinks: mx.array | None = None,
    causal: bool = False,
) -> mx.array:
    """q [1, Lq, H, D] over pool slots [offset, offset + length) of every head, through
    fused SDPA on strided views of the pools: nothing is copied (a quantized pool: only
    these slots are dequantized). causal: the queries are the last Lq of those keys, each
    seeing those up to its own (a prompt chunk)."""
    end = offset + (length or 0)
    turn_k, turn_v = cache.rotated
    keys = cache.read_slots(0, offset, end, q.dtype, rotated=True)[None]
    values = cache.values_of(
        keys, lambda: cache.read_slots(1, offset, end, q.dtype, rotated=True)[None]
    )
    o = mx.fast.scaled_dot_product_attention(
        turn(q, turn_k).transpose(0, 2, 1, 3),
        keys,
        values,
        scale=scale,
        mask="causal" if causal else None,
        sinks=sinks,
    )
    return turn(o.transpose(0, 2, 1, 3), turn_v)
