"""Turns a scheduled batch into MLX arrays, runs the model, samples: one mx.eval a step."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nanovllm_mlx.attention import AttentionMetadata, KVCache
from nanovllm_mlx.sampler import sample
from nanovllm_mlx.scheduler import ScheduledSeq


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: mx.Dtype) -> int:
    return 2 * model.n_layers * block_size * model.n_kv_heads * model.head_dim * dtype.size


@dataclass(slots=True)
class PreparedStep:
    input_ids: mx.array  # [T] flat tokens, decode entries first
    positions: mx.array  # [T]
    meta: AttentionMetadata
    samplers: list[ScheduledSeq]  # entries that sample, in flat order
    last_index: mx.array  # [len(samplers)] flat index of each sampler's last token


def prepare(batch: list[ScheduledSeq], block_size: int) -> PreparedStep:
    # Single-token entries (decodes, and prompts with one token left) share the cheap
    # [B, 1] attention path; the rest form the padded prefill batch.
    decodes = [item for item in batch if item.num_new_tokens == 1]
    prefills = [item for item in batch if item.num_new_tokens > 1]
    input_ids, positions, slots, last, samplers = [], [], [], [], []
    offset = 0
    for item in decodes + prefills:
        seq, start = item.seq, item.seq.num_computed_tokens
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
    meta = AttentionMetadata(
        slot_mapping=mx.array(np.concatenate(slots).astype(np.int32)),
        num_decode=len(decodes),
    )
    if decodes:
        _decode_metadata(meta, decodes, block_size)
    if prefills:
        _prefill_metadata(meta, prefills, block_size)
    return PreparedStep(
        input_ids=mx.array(input_ids, dtype=mx.int32),
        positions=mx.array(np.concatenate(positions).astype(np.int32)),
        meta=meta,
        samplers=samplers,
        last_index=mx.array(last, dtype=mx.int32),
    )


def _block_tables(items: list[ScheduledSeq], num_blocks: int) -> mx.array:
    # Padding entries point at block 0; the mask hides them.
    tables = np.zeros((len(items), num_blocks), dtype=np.int32)
    for i, item in enumerate(items):
        table = item.seq.block_table[:num_blocks]
        tables[i, : len(table)] = table
    return mx.array(tables)


def _decode_metadata(meta: AttentionMetadata, items: list[ScheduledSeq], block_size: int) -> None:
    context = np.array([it.seq.num_computed_tokens + 1 for it in items])
    num_blocks = -(-int(context.max()) // block_size)
    meta.decode_block_tables = _block_tables(items, num_blocks)
    keys = np.arange(num_blocks * block_size)
    meta.decode_mask = mx.array((keys[None, :] < context[:, None])[:, None, None, :])


def _prefill_metadata(meta: AttentionMetadata, items: list[ScheduledSeq], block_size: int) -> None:
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
    num_blocks = -(-context // block_size)
    keys = np.arange(num_blocks * block_size)
    meta.prefill_q_index = mx.array(q_index)
    meta.prefill_block_tables = _block_tables(items, num_blocks)
    meta.prefill_mask = mx.array((keys[None, None, :] <= q_pos[:, :, None])[:, None])
    meta.prefill_out_index = mx.array(np.concatenate(out_index).astype(np.int32))


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: mx.Dtype):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, model.n_kv_heads, model.head_dim)
        self.caches = [
            KVCache(mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype), block_size)
            for _ in range(model.n_layers)
        ]
        mx.eval([(c.k, c.v) for c in self.caches])

    def forward(self, step: PreparedStep) -> mx.array | None:
        """Lazy logits of each sampling entry's last token (None when none samples)."""
        hidden = self.model(step.input_ids, step.positions, self.caches, step.meta)
        if not step.samplers:
            return None
        return self.model.logits(hidden[step.last_index])

    def run(self, batch: list[ScheduledSeq]) -> tuple[list[int], list[float] | None]:
        """Compute this step's tokens; return the sampled token (and logprob) of each
        sampling entry, in batch order."""
        step = prepare(batch, self.block_size)
        logits = self.forward(step)
        cache_arrays = [(c.k, c.v) for c in self.caches]
        if logits is None:
            mx.eval(cache_arrays)
            return [], None
        tokens, logprobs = sample(logits, [item.seq for item in step.samplers])
        mx.eval(tokens, cache_arrays, [] if logprobs is None else logprobs)
        # Back to batch order, which is what the scheduler's postprocess expects.
        rank = {id(item): i for i, item in enumerate(step.samplers)}
        order = [rank[id(item)] for item in batch if item.samples]
        token_list = tokens.tolist()
        tokens_out = [token_list[i] for i in order]
        if logprobs is None:
            return tokens_out, None
        logprob_list = logprobs.tolist()
        return tokens_out, [logprob_list[i] for i in order]
