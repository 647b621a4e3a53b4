"""The attention interface, at the bottom of attention/: where a step's K/V go and what
each query may see (the metadata every backend shares, and the pool-row arithmetic
behind it, one place for both), and what a backend provides
(AttentionBackend); a layer's KV pools (KVCache) live in attention/kv_cache.py and are
re-exported here. The engine and the models import this; the backends' plans are
theirs alone, opaque to everything else.

Pools are head-major, [n_kv_heads, num_blocks * block_size, head_dim] per layer: viewed
as [n_kv_heads * slots, head_dim] a token's K/V row for head h is h * slots + slot, and
viewed as [n_kv_heads * num_blocks, block_size * head_dim] a whole block is one row.
Flat tokens are ordered decode tokens first (one per sequence), then the prefill chunks
one sequence after another.

A sliding-window layer (window W) lets the query at position p see keys (p - W, p]. Its
reads start at the block holding the first visible key, so blocks before it are never read
(and may have been freed: block tables then hold NULL_BLOCK there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention.kv_cache import KVCache as KVCache  # re-exported
from nanovllm_mlx.interop import to_mx

# A block-table entry whose block was freed because it left every layer's sliding window
# (the block manager frees them; attention reads start past them).
NULL_BLOCK = -1


def first_visible_key(position: np.ndarray, window: int | None) -> np.ndarray:
    """The first key position a query at `position` sees: 0, or position - W + 1."""
    if window is None:
        return np.zeros_like(position)
    first: np.ndarray = np.maximum(position - window + 1, 0)
    return first


@dataclass(frozen=True, slots=True)
class PoolLayout:
    n_kv_heads: int
    num_blocks: int
    block_size: int

    def __post_init__(self) -> None:
        if self.n_kv_heads * self.num_blocks * self.block_size >= 2**31:
            # Pool rows are int32 indices; this is ~256 GiB a pool, far past any device.
            raise ValueError(f"KV pool of {self.num_blocks} blocks is too large to index")

    def slots(self, block_table: list[int], start: int, end: int) -> np.ndarray:
        """Cache slots of positions [start, end) of a sequence with this block table."""
        pos = np.arange(start, end)
        table = np.asarray(block_table, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write_rows(self, slots: np.ndarray) -> mx.array:
        """[T] slots -> [T * Hkv] rows of the [Hkv * slots, D] view, token-major as a
        step's k/v come out of the projections."""
        heads = np.arange(self.n_kv_heads, dtype=np.int64) * (self.num_blocks * self.block_size)
        return to_mx((slots[:, None] + heads).reshape(-1).astype(np.int32))

    def block_rows(self, tables: np.ndarray) -> mx.array:
        """[B, nb] block tables -> the rows holding those blocks in the
        [Hkv * num_blocks, block_size * D] view, head by head."""
        heads = np.arange(self.n_kv_heads, dtype=np.int32)[:, None, None] * self.num_blocks
        return to_mx((heads + tables[None]).reshape(-1).astype(np.int32))

    def num_table_blocks(self, context: int) -> int:
        return -(-context // self.block_size)


def block_tables(
    tables: list[list[int]], num_blocks: int, first: np.ndarray | None = None
) -> np.ndarray:
    """Sequences' block tables as one [B, num_blocks] array, sequence i's starting at its
    block first[i] (default 0). Padding and freed (NULL_BLOCK) entries point at block 0; a
    mask (or the context length) hides them."""
    out = np.zeros((len(tables), num_blocks), dtype=np.int32)
    for i, table in enumerate(tables):
        table = table[0 if first is None else int(first[i]) :][:num_blocks]
        out[i, : len(table)] = table
    return np.maximum(out, 0)


@dataclass(slots=True)
class KeySpans:
    """What each query row reads, relative to the first block read for its sequence."""

    first_block: np.ndarray  # [B] table index of the first block read
    lo: np.ndarray  # [B] first visible key, counted from that block's first slot
    hi: np.ndarray  # [B] one past the last key (decode: the context length), likewise


def decode_spans(context_lens: np.ndarray, block_size: int, window: int | None) -> KeySpans:
    """Keys of decode queries at positions context - 1: all of them, or the last W."""
    lo = first_visible_key(context_lens - 1, window)
    first = lo // block_size
    base = first * block_size
    return KeySpans(first, lo - base, context_lens - base)


@dataclass(slots=True)
class DecodeEntries:
    """The step's single-token entries, shortest context first."""

    context_lens: np.ndarray  # [Bd] keys each query sees, its own included
    block_tables: list[list[int]]


@dataclass(slots=True)
class PrefillEntries:
    """The step's multi-token chunks, in flat order."""

    starts: list[int]  # position of each chunk's first token
    lengths: list[int]
    block_tables: list[list[int]]


class AttentionBackend(Protocol):
    """Reads of the paged cache: a metadata builder and the kernels that use it.

    A backend plans each step on the host (numpy in, MLX arrays out) and reads the pools
    in the layers. Adding one (a Metal kernel, say) is a new module with these methods and
    a line in attention/__init__.py's select_backend.
    """

    name: str
    # Whether all-decode steps write their K/V in place (attention/cuda_write.py) rather
    # than through MLX's scatter: such a step need not wait for the one before it.
    writes_in_place: bool

    def write(
        self, cache: KVCache, k: mx.array, v: mx.array | None, meta: AttentionMetadata
    ) -> None:
        """This step's k/v [T, Hkv, D] into the cache's rows meta.write_rows."""
        ...

    def plan_decode(
        self, entries: DecodeEntries, pool: PoolLayout, window: int | None = None
    ) -> Any: ...

    def reads_in_place(self, entries: DecodeEntries, pool: PoolLayout) -> bool:
        """Whether plan_decode reads these entries' keys where they lie while
        plan_decode_uniform would copy them: such a step is better run eager."""
        ...

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

    def decode(
        self, q: mx.array, cache: KVCache, plan: Any, scale: float, sinks: mx.array | None = None
    ) -> mx.array:
        """q [Bd, H, D] -> [Bd, H, D] (or any shape of the same size in that order).
        sinks [H]: per-head attention-sink logits (gpt-oss), or None."""
        ...

    def prefill(
        self, q: mx.array, cache: KVCache, plan: Any, scale: float, sinks: mx.array | None = None
    ) -> mx.array:
        """q [Tp, H, D] -> [Tp, H * D]"""
        ...


@dataclass(slots=True)
class AttentionMetadata:
    """One step's attention inputs, built by its backend, read by every layer."""

    backend: AttentionBackend
    write_rows: mx.array  # [T * Hkv] pool row of each new K/V row (PoolLayout.write_rows)
    num_decode: int  # the first num_decode flat tokens are single-token decodes
    decode: Any = None  # the backend's plan for them (full attention)
    prefill: Any = None  # the backend's plan for the prefill chunks
    # window -> (decode plan, prefill plan) for the sliding-window layers' reads
    windowed: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    # The recurrent layers' state slots (attention/state.py StateSteps), hybrids only.
    states: Any = None

    @property
    def in_place(self) -> bool:
        """The step writes K/V in place: an all-decode step (no prefill plan, full or
        windowed) on a backend that writes_in_place."""
        prefill = [self.prefill, *(p for _, p in self.windowed.values())]
        return self.backend.writes_in_place and all(p is None for p in prefill)

    def plans(self, window: int | None) -> tuple[Any, Any]:
        if window is None:
            return self.decode, self.prefill
        return self.windowed[window]
