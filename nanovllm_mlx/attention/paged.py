"""Paged attention, the entry point every model layer calls, and the step's metadata built
through the chosen backend.

Every op here is lazy; the model runner evaluates the whole step (all layers' cache
writes and the sampled tokens) with one `mx.eval`. Tokens of all sequences in a step are
flat ([T, ...], no padding) for the projections; only attention regroups them: decode
tokens (one per sequence) through the backend's decode read, prefill chunks through its
prefill read. Which backend that is was decided once, at start-up (attention/__init__.py).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention.metadata import (
    AttentionBackend,
    AttentionMetadata,
    DecodeEntries,
    KVCache,
    PoolLayout,
    PrefillEntries,
)


def build_metadata(
    backend: AttentionBackend,
    pool: PoolLayout,
    slots: np.ndarray,
    decode: DecodeEntries | None,
    prefill: PrefillEntries | None,
    windows: tuple[int | None, ...] = (None,),
) -> AttentionMetadata:
    """slots: [T] the cache slot of every flat token, in flat order. windows: the distinct
    attention windows of the model's layers (None: full attention), one plan each."""

    def plans(window: int | None) -> tuple[Any, Any]:
        return (
            None if decode is None else backend.plan_decode(decode, pool, window),
            None if prefill is None else backend.plan_prefill(prefill, pool, window),
        )

    full = plans(None) if None in windows else (None, None)
    return AttentionMetadata(
        backend=backend,
        write_rows=pool.write_rows(slots),
        num_decode=0 if decode is None else len(decode.context_lens),
        decode=full[0],
        prefill=full[1],
        windowed={w: plans(w) for w in windows if w is not None},
    )


def paged_attention(
    q: mx.array,
    k: mx.array | None,
    v: mx.array | None,
    cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    sinks: mx.array | None = None,
) -> mx.array:
    """q [T, H, D], k/v [T, Hkv, D] of this step's tokens -> output [T, H * D]. A latent
    cache (KVCache.value_dim) takes v None and gives [T, H * value_dim].

    Writes k/v into the cache first, then reads each sequence's context back through its
    block table (all of it, or its last `window` keys), so a chunk sees its cached prefix,
    earlier chunks and itself alike; with k/v None nothing is written (the layer reads a
    cache another layer of the step wrote). sinks [H]: attention-sink logits (gpt-oss), one per
    query head, in every softmax's denominator.
    """
    t = q.shape[0]
    if k is not None:  # None: a layer reading another's keys (Gemma 4)
        meta.backend.write(cache, k, v, meta)
    decode_plan, prefill_plan = meta.plans(window)
    outputs = []
    d = meta.num_decode
    if d:
        o = meta.backend.decode(q[:d], cache, decode_plan, scale, sinks)
        outputs.append(o.reshape(d, -1))
    if d < t:
        outputs.append(meta.backend.prefill(q[d:], cache, prefill_plan, scale, sinks))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
