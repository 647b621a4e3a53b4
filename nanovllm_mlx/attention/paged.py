"""Paged attention, the entry point every model layer calls.

Every op here is lazy; the model runner evaluates the whole step (all layers' cache
writes and the sampled tokens) with one `mx.eval`. Tokens of all sequences in a step are
flat ([T, ...], no padding) for the projections; only attention regroups them: decode
tokens (one per sequence) through the backend's decode read, prefill chunks through its
prefill read. Which backend that is was decided once, at start-up (attention/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention.metadata import (
    AttentionMetadata,
    DecodeEntries,
    PoolLayout,
    PrefillEntries,
)


@dataclass(slots=True)
class KVCache:
    """One layer's K and V pools, [n_kv_heads, num_blocks * block_size, head_dim] each.

    A separate pool per layer, and no other references to it, lets MLX scatter into the
    buffer in place instead of copying it every step.
    """

    k: mx.array
    v: mx.array
    block_size: int

    def write(self, k: mx.array, v: mx.array, rows: mx.array) -> None:
        """k/v [T, Hkv, D] into the rows given by PoolLayout.write_rows.

        One Scatter per pool, in place when MLX can donate the buffer, which it does as the
        pool has no other reference (decode speed does not depend on the pool's size).
        pool[:, slots] = ... is ten ops per write, and on a GPU each op is host time in a
        single-stream decode step."""
        head_dim = k.shape[-1]
        for name, new in (("k", k), ("v", v)):
            pool = getattr(self, name)
            flat = pool.reshape(-1, head_dim)
            flat[rows] = new.reshape(-1, head_dim)
            setattr(self, name, flat.reshape(pool.shape))


class AttentionBackend(Protocol):
    """Reads of the paged cache: a metadata builder and the kernels that use it.

    A backend plans each step on the host (numpy in, MLX arrays out) and reads the pools
    in the layers. Adding one (a Metal kernel, say) is a new module with these methods and
    a line in attention/__init__.py's select_backend.
    """

    name: str

    def plan_decode(
        self, entries: DecodeEntries, pool: PoolLayout, window: int | None = None
    ) -> Any: ...

    def plan_decode_uniform(
        self, entries: DecodeEntries, pool: PoolLayout, width: int
    ) -> dict[str, mx.array]:
        """A decode plan of arrays alone whose shapes are set by the batch size and the
        table width (`width` blocks each), full attention: what a compiled decode step
        takes (models with sliding windows run eager)."""
        ...

    def plan_prefill(
        self, entries: PrefillEntries, pool: PoolLayout, window: int | None = None
    ) -> Any: ...

    def decode(self, q: mx.array, cache: KVCache, plan: Any, scale: float) -> mx.array:
        """q [Bd, H, D] -> [Bd, H, D] (or any shape of the same size in that order)"""
        ...

    def prefill(self, q: mx.array, cache: KVCache, plan: Any, scale: float) -> mx.array:
        """q [Tp, H, D] -> [Tp, H * D]"""
        ...


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
    k: mx.array,
    v: mx.array,
    cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> mx.array:
    """q [T, H, D], k/v [T, Hkv, D] of this step's tokens -> output [T, H * D].

    Writes k/v into the cache first, then reads each sequence's context back through its
    block table (all of it, or its last `window` keys), so a chunk sees its cached prefix,
    earlier chunks and itself alike.
    """
    t, n_heads, head_dim = q.shape
    cache.write(k, v, meta.write_rows)
    decode_plan, prefill_plan = meta.plans(window)
    outputs = []
    d = meta.num_decode
    if d:
        o = meta.backend.decode(q[:d], cache, decode_plan, scale)
        outputs.append(o.reshape(d, n_heads * head_dim))
    if d < t:
        outputs.append(meta.backend.prefill(q[d:], cache, prefill_plan, scale))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
