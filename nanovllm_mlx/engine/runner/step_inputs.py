"""A scheduled batch as the arrays a step computes from: flat tokens, positions, and the
attention metadata its backend builds (host-side numpy in, MLX arrays out).

Two forms. `prepare` packs any batch (prefill chunks and decodes mixed) with no padding.
`prepare_decode` packs an all-decode batch padded to a bucket of batch size and block-table
width, so that a compiled decode step traces one graph per bucket instead of one per
token; the padding rows read and write only the pool's scratch block.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention.metadata import (
    AttentionBackend,
    AttentionMetadata,
    DecodeEntries,
    PoolLayout,
    PrefillEntries,
)
from nanovllm_mlx.attention.paged import build_metadata
from nanovllm_mlx.attention.state import Segment, StateSteps, build_state_steps
from nanovllm_mlx.buckets import bucket
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.interop import to_mx


@dataclass(slots=True)
class PreparedStep:
    input_ids: mx.array  # [T] flat tokens, decode entries first
    positions: mx.array  # [T]
    meta: AttentionMetadata
    samplers: list[ScheduledSeq]  # entries that sample, in flat order
    # [rows] flat index of each sampled row: a sampler's last token, or every position of
    # a speculating entry's chunk (ScheduledSeq.num_rows)
    last_index: mx.array | None
    padded: bool = False  # prepare_decode's form: rows [0, len(samplers)) are the real ones


def prepare(
    batch: list[ScheduledSeq],
    pool: PoolLayout,
    backend: AttentionBackend,
    ahead: mx.array | None = None,
    windows: tuple[int | None, ...] = (None,),
    scratch_state: int | None = None,
) -> PreparedStep:
    """The step's arrays; `windows`: the model's distinct attention windows (None: full
    attention), one attention plan each; `scratch_state`: for a model with recurrent
    layers, the state row of entries whose sequence has no slot (else None). With
    `ahead` (the lazy tokens sampled by the step launched just before, for this same
    all-decode batch) this is the step after that one: every sequence one position
    further, fed the token not yet read back."""
    shift = 0 if ahead is None else 1
    # Single-token entries (decodes, and prompts with one token left) share the cheap
    # decode read; the rest form the prefill chunks. Decodes go shortest context first,
    # which the gather path's length groups rely on.
    decodes = [item for item in batch if item.num_new_tokens == 1]
    decodes.sort(key=lambda item: item.start)
    prefills = [item for item in batch if item.num_new_tokens > 1]
    input_ids, positions, slots, samplers = [], [], [], []
    last: list[int] = []
    offset = 0
    for item in decodes + prefills:
        seq, start = item.seq, item.start + shift
        end = start + item.num_new_tokens
        input_ids += item.tokens(shift)
        positions.append(np.arange(start, end))
        slots.append(pool.slots(seq.block_table, start, end))
        offset += item.num_new_tokens
        if item.samples:
            last += range(offset - item.num_rows, offset)
            samplers.append(item)
    decode = decode_entries(decodes, ahead) if decodes else None
    prefill = None
    if prefills:
        prefill = PrefillEntries(
            [it.start for it in prefills],
            [it.num_new_tokens for it in prefills],
            [it.seq.block_table for it in prefills],
        )
    meta = build_metadata(backend, pool, np.concatenate(slots), decode, prefill, windows)
    if scratch_state is not None:
        assert ahead is None, "a model with recurrent state never runs a step ahead"
        meta.states = _state_steps(decodes, prefills, scratch_state)
    return PreparedStep(
        input_ids=mx.array(input_ids, dtype=mx.int32) if ahead is None else ahead,
        positions=to_mx(np.concatenate(positions).astype(np.int32)),
        meta=meta,
        samplers=samplers,
        last_index=mx.array(last, dtype=mx.int32),
    )


def _state_steps(
    decodes: list[ScheduledSeq], prefills: list[ScheduledSeq], scratch: int
) -> StateSteps:
    """Each entry's state slot, in flat order: whether it starts its sequence (a zero
    state) and where it snapshots its state (ScheduledSeq.snapshots)."""

    def slot(item: ScheduledSeq) -> int:
        return item.seq.state_slot if item.seq.state_slot >= 0 else scratch

    saves = [(i, snap.slot) for i, it in enumerate(decodes) for snap in it.snapshots]
    segments, offset = [], len(decodes)
    for item in prefills:
        snaps = tuple((snap.at, snap.slot) for snap in item.snapshots)
        segments.append(Segment(offset, item.num_new_tokens, slot(item), item.start == 0, snaps))
        offset += item.num_new_tokens
    return build_state_steps(
        [slot(it) for it in decodes], [it.start == 0 for it in decodes], saves, segments
    )


def decode_entries(batch: list[ScheduledSeq], ahead: mx.array | None = None) -> DecodeEntries:
    """An all-decode batch's entries, unpadded (`ahead`: as for prepare)."""
    shift = 0 if ahead is None else 1
    context = np.array([item.start + 1 + shift for item in batch], dtype=np.int32)
    return DecodeEntries(context, [item.seq.block_table for item in batch])


def is_uniform_decode(batch: list[ScheduledSeq]) -> bool:
    """Every entry decodes one token and samples it: the batches prepare_decode packs."""
    return all(item.num_new_tokens == 1 and item.samples for item in batch)


def prepare_decode(
    batch: list[ScheduledSeq],
    pool: PoolLayout,
    backend: AttentionBackend,
    scratch_block: int,
    ahead: mx.array | None = None,
) -> PreparedStep:
    """An all-decode batch padded to bucket(len(batch)) rows and tables of
    bucket(longest table) blocks. Padding rows sit at position 0 of `scratch_block`, a
    block the block manager never hands out. `ahead`: as for prepare."""
    n = len(batch)
    rows = bucket(n)
    real = decode_entries(batch, ahead)
    context = np.ones(rows, dtype=np.int32)
    context[:n] = real.context_lens
    positions = context - 1
    tables = real.block_tables + [[scratch_block]] * (rows - n)
    slots = np.full(rows, scratch_block * pool.block_size, dtype=np.int64)
    for i, item in enumerate(batch):
        slots[i] = pool.slots(item.seq.block_table, int(positions[i]), int(positions[i]) + 1)[0]
    entries = DecodeEntries(context, tables)
    width = bucket(pool.num_table_blocks(int(context.max())))
    if ahead is None:
        ids = [item.seq.token_ids[int(p)] for item, p in zip(batch, positions)]
        input_ids = mx.array(ids + [0] * (rows - n), dtype=mx.int32)
    else:
        input_ids = ahead if rows == n else mx.concatenate([ahead, mx.zeros(rows - n, mx.int32)])
    return PreparedStep(
        input_ids=input_ids,
        positions=to_mx(positions),
        meta=AttentionMetadata(
            backend=backend,
            write_rows=pool.write_rows(slots),
            num_decode=rows,
            decode=backend.plan_decode_uniform(entries, pool, width),
        ),
        samplers=list(batch),
        last_index=None,
        padded=True,
    )
