"""How the gather backend reads a decode batch: in groups of similar context length,
each gathered and padded to its longest, or, for one sequence whose visible keys sit in
consecutive blocks, a view of the pool read in place (attention/gather.py plans which).

Only a lone sequence is read in place. In a batch, a sequence's next block is mostly its
neighbour's (blocks are handed out in turn as the batch prefills), so its table stops
being consecutive at its first block boundary of decode: two 300-token prompts on the
CPU held blocks 0-18 and 19-37, and by their tenth step 38 and 39 (v20). Reading a
batch's sequences in place would need an allocator that keeps room after each one.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from nanovllm_mlx.interop import to_mx

MAX_GROUPS = 4  # decode length groups
MIN_GROUP = 8  # sequences per group, at least


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
