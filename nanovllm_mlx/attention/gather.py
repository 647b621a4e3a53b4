"""The pure-MLX attention backend: gather whole blocks, then fused SDPA or matmuls.

It runs everywhere (CPU, Metal, CUDA) and is the reference the kernels are tested
against. Gathering a block is one contiguous row of the pool (head-major layout), which
MLX's gather copies with memcpy; each (head, sequence) pair then reads one contiguous
[L, head_dim] matrix (the token-major layout cost 6-8x more on CPU at batch 32, measured
in benchmarks/attention_layouts.py). Decode batches are read in groups of similar context
length (attention/decode_groups.py), so that little of what is gathered is padding. With fused
SDPA, a lone decode or a prompt chunk whose blocks are consecutive skips the gather and
reads a view of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention.attend import gathered_attention, sliced_attention
from nanovllm_mlx.attention.chunk_shapes import padding
from nanovllm_mlx.attention.decode_groups import (
    DecodeGroup,
    contiguous_start,
    decode_mask,
    length_groups,
)
from nanovllm_mlx.attention.metadata import (
    AttentionMetadata,
    DecodeEntries,
    KVCache,
    PoolLayout,
    PrefillEntries,
    block_tables,
    decode_spans,
    first_visible_key,
)
from nanovllm_mlx.interop import to_mx

CUDNN_VIEW_SLOTS = 256  # MLX's kv_cache_step: views of caches of a multiple of it (cudnn_views)


@dataclass(slots=True)
class PrefillPlan:
    """Every chunk of the step padded to the longest and read together under a mask."""

    q_index: mx.array  # [Bp, Lq] index into the prefill tokens
    rows: mx.array  # [Hkv * Bp * nb] (PoolLayout.block_rows)
    mask: mx.array  # [Bp, Lq, L]
    out_index: mx.array  # [Tp] index into the flattened [Bp * Lq]


@dataclass(slots=True)
class CausalChunk:
    """One sequence's chunk of full attention read on its own: prefill tokens [begin,
    end) are the last of the first `length` keys of its blocks, each seeing those up to
    its own, which fused SDPA's causal mode does without a mask array. Its blocks are
    gathered (rows) or, where they are consecutive, read in place from pool slots
    [offset, offset + length), a view of the pool as a lone decode's."""

    begin: int
    end: int
    rows: mx.array | None  # [Hkv * nb] (PoolLayout.block_rows); None: read in place
    length: int
    offset: int | None = None
    # Queries added before and (with as many keys) after the chunk: chunk_shapes.padding.
    front: int = 0
    back: int = 0


class GatherAttention:
    """fused: use MLX's fused SDPA after the gather (GPUs); False on CPU, where two
    matmuls over the gathered blocks are faster.

    cudnn_views: MLX's CUDA build, whose one-query SDPA over a view of a cache whose slot
    count is a multiple of 256 goes to cuDNN's decode path, and that path reads the view
    from the cache's first slot, as if every view began there (mlx/backend/cuda/
    scaled_dot_product_attention.cpp: use_cudnn_for_decoding, unslice_kv; mlx-lm's views
    do). A lone sequence's keys are then gathered rather than read in place from such a
    pool (slice_in_place)."""

    name = "gather"
    writes_in_place = False

    def __init__(self, fused: bool, cudnn_views: bool = False, chunk_buckets: bool = False):
        self.fused = fused
        self.cudnn_views = cudnn_views
        self.chunk_buckets = chunk_buckets

    def slice_in_place(self, pool: PoolLayout) -> bool:
        """Whether a lone sequence whose blocks are consecutive is read in place."""
        slots = pool.num_blocks * pool.block_size
        return self.fused and not (self.cudnn_views and slots % CUDNN_VIEW_SLOTS == 0)

    def write(
        self, cache: KVCache, k: mx.array, v: mx.array | None, meta: AttentionMetadata
    ) -> None:
        cache.write(k, v, meta.write_rows)

    def reads_in_place(self, entries: DecodeEntries, pool: PoolLayout) -> bool:
        """A lone sequence whose blocks are consecutive (plan_decode slices it); full
        attention, as every compiled step is."""
        if len(entries.context_lens) != 1 or not self.slice_in_place(pool):
            return False
        table = entries.block_tables[0][: pool.num_table_blocks(int(entries.context_lens[0]))]
        return contiguous_start(np.asarray(table)) is not None

    def plan_decode(
        self, entries: DecodeEntries, pool: PoolLayout, window: int | None = None
    ) -> list[DecodeGroup]:
        bs = pool.block_size
        spans = decode_spans(entries.context_lens, bs, window)
        tables = block_tables(
            entries.block_tables, pool.num_table_blocks(int(spans.hi.max())), spans.first_block
        )
        groups = []
        sliced = self.slice_in_place(pool)
        for start, end in length_groups(spans.hi, bs):
            lo, hi = spans.lo[start:end], spans.hi[start:end]
            if sliced and end - start == 1:
                # SDPA reads a strided slice of the pool in place (on Metal its one-query
                # kernel takes the pool's head stride as it is); a gather copies every key.
                first = contiguous_start(tables[start, : pool.num_table_blocks(int(hi[0]))])
                if first is not None:
                    offset = first * bs + int(lo[0])
                    groups.append(DecodeGroup(start, end, None, None, int(hi[0] - lo[0]), offset))
                    continue
            # One sequence that sees all its keys reads the first `length` of them, unmasked.
            whole = end - start == 1 and lo[0] == 0
            rows = pool.block_rows(tables[start:end, : pool.num_table_blocks(int(hi.max()))])
            mask = None if whole else decode_mask(lo, hi, bs)
            groups.append(DecodeGroup(start, end, rows, mask, int(hi[0]) if whole else None))
        return groups

    def plan_prefill(
        self, entries: PrefillEntries, pool: PoolLayout, window: int | None = None
    ) -> PrefillPlan | list[CausalChunk]:
        """Fused SDPA, full attention: each chunk on its own, causal. A [Bp, Lq, L] mask
        costs its own bytes (MLX turns it into a float bias every layer), pads every
        chunk to the step's longest, and on CUDA makes each step's shapes a cuDNN graph of
        their own. Otherwise (matmuls, or a sliding window) all chunks padded and masked."""
        if self.fused and window is None:
            return self._causal_chunks(entries, pool)
        lengths = entries.lengths
        bp, lq = len(lengths), max(lengths)
        bs = pool.block_size
        starts = np.array(entries.starts, dtype=np.int64)
        # Each chunk is read from the block holding its first query's first visible key.
        first = first_visible_key(starts, window) // bs
        base = first * bs
        q_index = np.zeros((bp, lq), dtype=np.int32)
        # Padding queries repeat the chunk's last position, so no row is fully masked.
        q_pos = np.zeros((bp, lq), dtype=np.int64)
        out_index, offset = [], 0
        for b, (start, n) in enumerate(zip(entries.starts, lengths)):
            q_index[b, :n] = np.arange(offset, offset + n)
            q_pos[b, :n] = np.arange(start, start + n)
            q_pos[b, n:] = start + n - 1
            out_index.append(np.arange(b * lq, b * lq + n))
            offset += n
        context = int((starts + np.array(lengths) - base).max())
        tables = block_tables(entries.block_tables, pool.num_table_blocks(context), first)
        keys = base[:, None, None] + np.arange(tables.shape[1] * bs)[None, None, :]
        visible = keys <= q_pos[:, :, None]
        if window is not None:
            visible &= keys > q_pos[:, :, None] - window
        return PrefillPlan(
            q_index=to_mx(q_index),
            rows=pool.block_rows(tables),
            mask=to_mx(visible),
            out_index=to_mx(np.concatenate(out_index).astype(np.int32)),
        )

    def _causal_chunks(self, entries: PrefillEntries, pool: PoolLayout) -> list[CausalChunk]:
        # Every chunk may be read in place, whatever cudnn_views says: MLX's cuDNN path
        # misreads views only for one query, and a prompt chunk has two or more (a lone
        # token is a decode entry: step_inputs.prepare).
        chunks, begin, slots = [], 0, pool.num_blocks * pool.block_size
        for table, start, n in zip(entries.block_tables, entries.starts, entries.lengths):
            assert n > 1, "a one-token chunk is read as a decode"
            front, back = padding(start, n) if self.chunk_buckets else (0, 0)
            # A chunk of full attention sees keys [0, start + n), and reads `back` more.
            length = start + n + back
            first = contiguous_start(block_tables([table], pool.num_table_blocks(start + n))[0])
            if first is not None and first * pool.block_size + length <= slots:
                # A long prompt's later chunks read its earlier keys where they lie, rather
                # than gathering the whole context again every chunk.
                offset = first * pool.block_size
                chunks.append(CausalChunk(begin, begin + n, None, length, offset, front, back))
            else:
                rows = pool.block_rows(block_tables([table], pool.num_table_blocks(length)))
                chunks.append(CausalChunk(begin, begin + n, rows, length, None, front, back))
            begin += n
        return chunks

    def plan_decode_uniform(
        self, entries: DecodeEntries, pool: PoolLayout, width: int
    ) -> dict[str, mx.array]:
        """One group over the whole batch, every table `width` blocks: a structure set by
        the shapes alone, what a compiled decode step is traced with."""
        tables = block_tables(entries.block_tables, width)
        keys = np.arange(width * pool.block_size)
        mask = keys[None, :] < entries.context_lens[:, None]
        return {"rows": pool.block_rows(tables), "mask": to_mx(mask[:, None, :])}

    def decode(
        self,
        q: mx.array,
        cache: KVCache,
        plan: list[DecodeGroup] | dict[str, mx.array],
        scale: float,
        sinks: mx.array | None = None,
    ) -> mx.array:
        if isinstance(plan, dict):
            return gathered_attention(
                q[:, None],
                cache,
                plan["rows"],
                plan["mask"],
                scale,
                fused=self.fused,
                sinks=sinks,
            )
        o = []
        for g in plan:
            qg = q[g.start : g.end, None]
            if g.offset is not None:
                o.append(sliced_attention(qg, cache, g.offset, g.length, scale, sinks))
            else:
                assert g.rows is not None  # a group is read in place or gathered
                o.append(
                    gathered_attention(
                        qg, cache, g.rows, g.mask, scale, g.length, self.fused, sinks=sinks
                    )
                )
        return o[0] if len(o) == 1 else mx.concatenate(o, axis=0)  # [Bd, 1, H, D]

    def prefill(
        self,
        q: mx.array,
        cache: KVCache,
        plan: PrefillPlan | list[CausalChunk],
        scale: float,
        sinks: mx.array | None = None,
    ) -> mx.array:
        if isinstance(plan, list):
            outs = []
            for c in plan:
                qc = q[None, c.begin : c.end]
                if c.front or c.back:
                    qc = mx.pad(qc, [(0, 0), (c.front, c.back), (0, 0), (0, 0)])
                if c.rows is None:
                    assert c.offset is not None  # a chunk is read in place or gathered
                    oc = sliced_attention(qc, cache, c.offset, c.length, scale, sinks, True)
                else:
                    oc = gathered_attention(
                        qc, cache, c.rows, None, scale, c.length, self.fused, True, sinks
                    )
                n = c.end - c.begin
                outs.append(oc[0, c.front : c.front + n].reshape(n, -1))
            return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        bp, lq = plan.q_index.shape
        qp = q[plan.q_index] if bp > 1 else q[None]  # one chunk: no padding to index
        o = gathered_attention(
            qp, cache, plan.rows, plan.mask, scale, fused=self.fused, sinks=sinks
        )
        o = o.reshape(bp * lq, -1)
        return o[plan.out_index] if bp > 1 else o
