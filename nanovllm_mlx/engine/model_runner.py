"""Turns a scheduled batch into MLX arrays, runs the model, samples: one mx.eval a step.

A decode step can also be launched one step ahead: its input tokens are the previous
step's sampled tokens, still lazy on the device, so the device computes step t+1 while
the host reads step t's tokens, detokenizes them and schedules again (mlx-lm's
generate_step pipelines a single stream the same way). The scheduler decides when that
is safe (reserve_ahead); a launch whose batch then changes is simply dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention.paged import AttentionMetadata, DecodeGroup, KVCache, pool_rows
from nanovllm_mlx.engine.sampler import sample
from nanovllm_mlx.engine.scheduler import ScheduledSeq

MAX_GROUPS = 4  # decode length groups on the gather path
MIN_GROUP = 8  # sequences per group, at least


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: mx.Dtype) -> int:
    return 2 * model.n_layers * block_size * model.n_kv_heads * model.head_dim * dtype.size


@dataclass(slots=True)
class PreparedStep:
    input_ids: mx.array  # [T] flat tokens, decode entries first
    positions: mx.array  # [T]
    meta: AttentionMetadata
    samplers: list[ScheduledSeq]  # entries that sample, in flat order
    last_index: mx.array  # [len(samplers)] flat index of each sampler's last token


def prepare(
    batch: list[ScheduledSeq],
    block_size: int,
    pool: tuple[int, int],
    ahead: mx.array | None = None,
) -> PreparedStep:
    """The step's arrays. pool: (n_kv_heads, num_blocks) of the KV pools, which locate a
    slot's row for the cache writes and a block's rows for the gather path. With `ahead`
    (the lazy tokens sampled by the step launched just before, for this same all-decode
    batch) this is the step after that one: every sequence one position further, fed the
    token not yet read back."""
    shift = 0 if ahead is None else 1
    # Single-token entries (decodes, and prompts with one token left) share the cheap
    # [B, 1] attention path; the rest form the padded prefill batch.
    decodes = [item for item in batch if item.num_new_tokens == 1]
    decodes.sort(key=lambda item: item.seq.num_computed_tokens)  # for _length_groups
    prefills = [item for item in batch if item.num_new_tokens > 1]
    input_ids, positions, slots, last, samplers = [], [], [], [], []
    offset = 0
    for item in decodes + prefills:
        seq, start = item.seq, item.seq.num_computed_tokens + shift
        end = start + item.num_new_tokens
        input_ids += seq.token_ids[start:end]
        pos = np.arange(start, end)
        positions.append(pos)
        table = np.asarray(seq.block_table, dtype=np.int64)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        offset += item.num_new_tokens
        if item.samples:
            last.append(offset - 1)
            samplers.append(item)
    n_kv_heads, num_blocks = pool
    heads = np.arange(n_kv_heads, dtype=np.int64) * (num_blocks * block_size)
    rows = np.concatenate(slots)[:, None] + heads  # token-major, as k/v come: [T, Hkv]
    meta = AttentionMetadata(
        write_rows=mx.array(rows.reshape(-1).astype(np.int32)),
        num_decode=len(decodes),
    )
    if decodes:
        _decode_metadata(meta, decodes, block_size, pool, shift)
    if prefills:
        _prefill_metadata(meta, prefills, block_size, pool)
    return PreparedStep(
        input_ids=mx.array(input_ids, dtype=mx.int32) if ahead is None else ahead,
        positions=mx.array(np.concatenate(positions).astype(np.int32)),
        meta=meta,
        samplers=samplers,
        last_index=mx.array(last, dtype=mx.int32),
    )


def _block_tables(items: list[ScheduledSeq], num_blocks: int) -> np.ndarray:
    # Padding entries point at block 0; the mask (or the context length) hides them.
    tables = np.zeros((len(items), num_blocks), dtype=np.int32)
    for i, item in enumerate(items):
        table = item.seq.block_table[:num_blocks]
        tables[i, : len(table)] = table
    return tables


def _decode_metadata(
    meta: AttentionMetadata,
    items: list[ScheduledSeq],
    block_size: int,
    pool: tuple[int, int],
    shift: int,
) -> None:
    context = np.array([it.seq.num_computed_tokens + 1 + shift for it in items], dtype=np.int32)
    max_context = int(context.max())
    tables = _block_tables(items, -(-max_context // block_size))
    if cuda_attention.available():
        meta.decode_block_tables = mx.array(tables)
        meta.decode_context_lens = mx.array(context)
        meta.decode_max_context = max_context
        return
    meta.decode_groups = [
        DecodeGroup(
            start,
            end,
            pool_rows(tables[start:end, : -(-context[end - 1] // block_size)], *pool),
            _decode_mask(context[start:end], block_size) if end - start > 1 else None,
            int(context[start]) if end - start == 1 else None,
        )
        for start, end in _length_groups(context, block_size)
    ]


def _length_groups(context: np.ndarray, block_size: int) -> list[tuple[int, int]]:
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


def _decode_mask(context: np.ndarray, block_size: int) -> mx.array:
    keys = np.arange(-(-int(context.max()) // block_size) * block_size)
    return mx.array((keys[None, :] < context[:, None])[:, None, :])


def _prefill_metadata(
    meta: AttentionMetadata, items: list[ScheduledSeq], block_size: int, pool: tuple[int, int]
) -> None:
    lengths = [it.num_new_tokens for it in items]
    bp, lq = len(items), max(lengths)
    q_index = np.zeros((bp, lq), dtype=np.int32)
    # Padding queries sit at position 0 and see key 0, so no row is fully masked.
    q_pos = np.zeros((bp, lq), dtype=np.int64)
    out_index, offset = [], 0
    for b, (item, n) in enumerate(zip(items, lengths)):
        start = item.seq.num_computed_tokens
        q_index[b, :n] = np.arange(offset, offset + n)
        q_pos[b, :n] = np.arange(start, start + n)
        out_index.append(np.arange(b * lq, b * lq + n))
        offset += n
    context = max(it.seq.num_computed_tokens + n for it, n in zip(items, lengths))
    tables = _block_tables(items, -(-context // block_size))
    keys = np.arange(tables.shape[1] * block_size)
    meta.prefill_q_index = mx.array(q_index)
    meta.prefill_rows = pool_rows(tables, *pool)
    meta.prefill_mask = mx.array(keys[None, None, :] <= q_pos[:, :, None])
    meta.prefill_out_index = mx.array(np.concatenate(out_index).astype(np.int32))


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: mx.Dtype):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.pool = (model.n_kv_heads, num_blocks)
        if model.n_kv_heads * num_blocks * block_size >= 2**31:
            # Pool rows are int32 indices; this is ~256 GiB a pool, far past any device.
            raise ValueError(f"KV pool of {num_blocks} blocks is too large to index")
        shape = (model.n_kv_heads, num_blocks * block_size, model.head_dim)
        self.caches = [
            KVCache(mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype), block_size)
            for _ in range(model.n_layers)
        ]
        mx.eval([(c.k, c.v) for c in self.caches])
        self._ahead: _Ahead | None = None
        self.steps_ahead_used = 0  # launched ahead and used
        self.steps_ahead_dropped = 0  # launched ahead, then the batch changed

    def forward(self, step: PreparedStep) -> mx.array | None:
        """Lazy logits of each sampling entry's last token (None when none samples)."""
        hidden = self.model(step.input_ids, step.positions, self.caches, step.meta)
        if not step.samplers:
            return None
        return self.model.logits(hidden[step.last_index])

    def _launch(self, step: PreparedStep, output_offset: int) -> _Launched:
        """Build the step's graph and start it on the device without waiting."""
        logits = self.forward(step)
        cache_arrays = [(c.k, c.v) for c in self.caches]
        if logits is None:
            mx.async_eval(cache_arrays)
            return _Launched(step, None, None)
        seqs = [item.seq for item in step.samplers]
        tokens, logprobs = sample(logits, seqs, output_offset)
        mx.async_eval(tokens, cache_arrays, [] if logprobs is None else logprobs)
        return _Launched(step, tokens, logprobs)

    def run(
        self, batch: list[ScheduledSeq], look_ahead: bool = False
    ) -> tuple[list[int], list[float] | None]:
        """Compute this step's tokens; return the sampled token (and logprob) of each
        sampling entry, in batch order. With look_ahead (an all-decode batch whose next
        step the scheduler has reserved blocks for), also launch the next step before
        waiting for this one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.key == _batch_key(batch, 0):
            launched = ahead.launched
            self.steps_ahead_used += 1
        else:
            self.steps_ahead_dropped += ahead is not None
            launched = self._launch(prepare(batch, self.block_size, self.pool), 0)
        if look_ahead:
            step = prepare(batch, self.block_size, self.pool, ahead=launched.tokens)
            self._ahead = _Ahead(_batch_key(batch, 1), self._launch(step, 1))
        if launched.tokens is None:
            mx.eval([(c.k, c.v) for c in self.caches])
            return [], None
        # Back to batch order, which is what the scheduler's postprocess expects.
        samplers = launched.step.samplers
        rank = {item.seq.seq_id: i for i, item in enumerate(samplers)}
        order = [rank[item.seq.seq_id] for item in batch if item.samples]
        token_list = launched.tokens.tolist()
        tokens_out = [token_list[i] for i in order]
        if launched.logprobs is None:
            return tokens_out, None
        logprob_list = launched.logprobs.tolist()
        return tokens_out, [logprob_list[i] for i in order]


@dataclass(slots=True)
class _Launched:
    step: PreparedStep
    tokens: mx.array | None  # lazy, in the step's sampler order
    logprobs: mx.array | None


@dataclass(slots=True)
class _Ahead:
    key: tuple  # the batch, as _batch_key, this launch is the right step for
    launched: _Launched


def _batch_key(batch: list[ScheduledSeq], shift: int) -> tuple:
    return tuple(
        (item.seq.seq_id, item.seq.num_computed_tokens + shift, item.num_new_tokens)
        for item in batch
    )
