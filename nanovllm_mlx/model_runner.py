"""Turns a scheduled batch into MLX arrays, runs the model, samples: one mx.eval a step."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nanovllm_mlx.attention import AttentionMetadata, KVCache
from nanovllm_mlx.sampler import sample
from nanovllm_mlx.scheduler import ScheduledSeq


def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: mx.Dtype) -> int:
    return 2 * model.n_layers * block_size * model.n_kv_heads * model.head_dim * dtype.size


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

    def run(self, batch: list[ScheduledSeq]) -> tuple[list[int], list[float] | None]:
        """Compute this step's tokens; return the sampled token (and logprob) of each
        sampling entry, in batch order."""
        # Single-token entries (decodes, and prompts with one token left) share the cheap
        # [B, 1] attention path; the rest form the padded prefill batch.
        decodes = [item for item in batch if item.num_new_tokens == 1]
        prefills = [item for item in batch if item.num_new_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, slots = [], [], []
        for item in ordered:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids += seq.token_ids[start:end]
            pos = np.arange(start, end)
            positions.append(pos)
            table = np.asarray(seq.block_table, dtype=np.int64)
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
        meta = AttentionMetadata(
            slot_mapping=mx.array(np.concatenate(slots).astype(np.int32)),
            num_decode=len(decodes),
        )
        if decodes:
            self._decode_metadata(meta, decodes)
        if prefills:
            self._prefill_metadata(meta, prefills)

        # Logits only for the last token of each sampling entry.
        last, offset = [], 0
        samplers = []
        for item in ordered:
            offset += item.num_new_tokens
            if item.samples:
                last.append(offset - 1)
                samplers.append(item)
        hidden = self.model(
            mx.array(input_ids, dtype=mx.int32),
            mx.array(np.concatenate(positions).astype(np.int32)),
            self.caches,
            meta,
        )
        cache_arrays = [(c.k, c.v) for c in self.caches]
        if not samplers:
            mx.eval(cache_arrays)
            return [], None
        logits = self.model.logits(hidden[mx.array(last, dtype=mx.int32)])
        tokens, logprobs = sample(logits, [item.seq for item in samplers])
        mx.eval(tokens, cache_arrays, [] if logprobs is None else logprobs)
        # Back to batch order, which is what the scheduler's postprocess expects.
        rank = {id(item): i for i, item in enumerate(samplers)}
        order = [rank[id(item)] for item in batch if item.samples]
        token_list = tokens.tolist()
        tokens_out = [token_list[i] for i in order]
        if logprobs is None:
            return tokens_out, None
        logprob_list = logprobs.tolist()
        return tokens_out, [logprob_list[i] for i in order]

    def _block_tables(self, items: list[ScheduledSeq], num_blocks: int) -> mx.array:
        tables = np.zeros((len(items), num_blocks), dtype=np.int32)
        for i, item in enumerate(items):
            table = item.seq.block_table[:num_blocks]
            tables[i, : len(table)] = table
        return mx.array(tables)

    def _decode_metadata(self, meta: AttentionMetadata, items: list[ScheduledSeq]) -> None:
        context = np.array([it.seq.num_computed_tokens + 1 for it in items])
        num_blocks = -(-int(context.max()) // self.block_size)
        meta.decode_block_tables = self._block_tables(items, num_blocks)
        keys = np.arange(num_blocks * self.block_size)
        meta.decode_mask = mx.array((keys[None, :] < context[:, None])[:, None, None, :])

    def _prefill_metadata(self, meta: AttentionMetadata, items: list[ScheduledSeq]) -> None:
        lengths = [it.num_new_tokens for it in items]
        bp, lq = len(items), max(lengths)
        q_index = np.zeros((bp, lq), dtype=np.int32)
        # Padding queries sit at position 0 and see key 0, so no row is fully masked.
        q_pos = np.zeros((bp, lq), dtype=np.int64)
        out_index, offset = [], 0
        for b, (item, n) in enumerate(zip(items, lengths)):
            q_index[b, :n] = np.arange(offset, offset + n)
            q_pos[b, :n] = np.arange(item.seq.num_computed_tokens, item.seq.num_computed_tokens + n)
            out_index.append(np.arange(b * lq, b * lq + n))
            offset += n
        context = max(it.seq.num_computed_tokens + n for it, n in zip(items, lengths))
        num_blocks = -(-context // self.block_size)
        keys = np.arange(num_blocks * self.block_size)
        meta.prefill_q_index = mx.array(q_index)
        meta.prefill_block_tables = self._block_tables(items, num_blocks)
        meta.prefill_mask = mx.array((keys[None, None, :] <= q_pos[:, :, None])[:, None])
        meta.prefill_out_index = mx.array(np.concatenate(out_index).astype(np.int32))
