"""How the gather backend splits a decode batch: sequences read in place (a view of the
pool, when their visible keys sit in consecutive blocks) and runs of the others gathered
in groups of similar context length. attention/gather.py plans with it.

A gathered sequence costs a copy of every key and value it sees, each step, on top of
SDPA's own read of them; a sequence read in place costs one more SDPA launch a layer
instead. On an H100 with our kernels off (8B 4-bit, one stream after 8,192 tokens, eager)
the gather took 3.86 ms of a 12.4 ms step (benchmarks/logs/h100_v20_anatomy-off.log);
read in place, the same stream decoded at 117 tok/s (8.5 ms a step, v19's metal-like-8b).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention.metadata import KeySpans
from nanovllm_mlx.interop import to_mx

MAX_GROUPS = 4  # decode length groups
MIN_GROUP = 8  # sequences per group, at least
# Batches of up to SLICED_BATCH sequences read each one whose keys are consecutive, and
# number at least SLICED_MIN_KEYS, in place; a lone sequence always is. Not measured
# (no device time was left when it was built): the figures follow from the costs above.
# A copy of K and V moves twice the bytes SDPA then reads, and a launch costs a few
# microseconds, so from ~1,000 keys the copy is the larger cost; past 8 sequences the
# launches a layer multiply while one gathered group's stay at one.
# NANOVLLM_SLICED_BATCH=1 slices lone sequences alone, as before.
SLICED_BATCH = max(int(os.environ.get("NANOVLLM_SLICED_BATCH", "8")), 1)
SLICED_MIN_KEYS = 1024


@dataclass(slots=True)
class DecodeGroup:
    """Decode tokens [start, end) whose contexts are read together, padded to the longest."""

    start: int
    end: int
    rows: mx.array | None  # pool rows of the sequences' blocks (PoolLayout.block_rows)
    mask: mx.array | None  # [n, 1, L] key visible; None: all
    length: int | None = None  # read only the first `length` keys (a one-sequence group)
    # One sequence whose visible keys sit in consecutive blocks: they are pool slots
    # [offset, offset + length) of every head, read in place (no gather).
    offset: int | None = None


def contiguous_start(table: np.ndarray) -> int | None:
    """The first block of a table whose blocks are consecutive, else None."""
    if len(table) > 1 and np.any(np.diff(table) != 1):
        return None
    return int(table[0])


def length_groups(context: np.ndarray, block_size: int) -> list[tuple[int, int]]:
    """Split a decode batch, sorted by context length, into up to MAX_GROUPS runs of equal
    size, merging neighbours that pad to the same number of blocks. Padding every sequence
    to the longest wasted about half the gather path's reads for mixed lengths."""
    n = len(context)
    k = max(1, min(MAX_GROUPS, n // MIN_GROUP))
    bounds = [n * i // k for i in range(k + 1)]
    blocks = -(-context // block_size)
    groups: list[tuple[int, int]] = []
    for start, end in zip(bounds, bounds[1:]):
        if groups and blocks[groups[-1][1] - 1] == blocks[end - 1]:
            groups[-1] = (groups[-1][0], end)
        else:
            groups.append((start, end))
    return groups


def decode_mask(lo: np.ndarray, hi: np.ndarray, block_size: int) -> mx.array:
    keys = np.arange(-(-int(hi.max()) // block_size) * block_size)
    return to_mx(((keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None]))[:, None])


def in_place_offsets(spans: KeySpans, tables: np.ndarray, block_size: int) -> list[int | None]:
    """For each sequence of a decode batch, the pool slot its visible keys start at if it
    is read in place (SLICED_BATCH, SLICED_MIN_KEYS), else None. tables: the batch's block
    tables from each sequence's first visible block (metadata.block_tables)."""
    n = len(spans.hi)
    if n > SLICED_BATCH:
        return [None] * n
    offsets: list[int | None] = []
    for i in range(n):
        lo, hi = int(spans.lo[i]), int(spans.hi[i])
        first = None
        if n == 1 or hi - lo >= SLICED_MIN_KEYS:
            first = contiguous_start(tables[i, : -(-hi // block_size)])
        offsets.append(None if first is None else first * block_size + lo)
    return offsets


def runs(offsets: list[int | None]) -> list[tuple[int, int, int | None]]:
    """The batch in order as (start, end, offset): each sequence read in place alone, the
    others in runs of neighbours (offset None) that are gathered."""
    out: list[tuple[int, int, int | None]] = []
    for i, offset in enumerate(offsets):
        if offset is not None:
            out.append((i, i + 1, offset))
        elif out and out[-1][2] is None and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1, None)
        else:
            out.append((i, i + 1, None))
    return out
