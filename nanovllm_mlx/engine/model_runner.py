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
import numpy as np

from nanovllm_mlx.attention import select_backend
from nanovllm_mlx.attention.metadata import (
    AttentionMetadata,
    DecodeEntries,
    PoolLayout,
    PrefillEntries,
)
from nanovllm_mlx.attention.paged import AttentionBackend, KVCache, build_metadata
from nanovllm_mlx.engine.sampler import sample
from nanovllm_mlx.engine.scheduler import ScheduledSeq
from nanovllm_mlx.models.base import CausalLM


@dataclass(slots=True)
class PreparedStep:
    input_ids: mx.array  # [T] flat tokens, decode entries first
    positions: mx.array  # [T]
    meta: AttentionMetadata
    samplers: list[ScheduledSeq]  # entries that sample, in flat order
    last_index: mx.array  # [len(samplers)] flat index of each sampler's last token


def prepare(
    batch: list[ScheduledSeq],
    pool: PoolLayout,
    backend: AttentionBackend,
    ahead: mx.array | None = None,
    windows: tuple[int | None, ...] = (None,),
) -> PreparedStep:
    """The step's arrays. With `ahead` (the lazy tokens sampled by the step launched just
    before, for this same all-decode batch) this is the step after that one: every
    sequence one position further, fed the token not yet read back."""
    shift = 0 if ahead is None else 1
    # Single-token entries (decodes, and prompts with one token left) share the cheap
    # decode read; the rest form the prefill chunks. Decodes go shortest context first,
    # which the gather path's length groups rely on.
    decodes = [item for item in batch if item.num_new_tokens == 1]
    decodes.sort(key=lambda item: item.seq.num_computed_tokens)
    prefills = [item for item in batch if item.num_new_tokens > 1]
    input_ids, positions, slots, last, samplers = [], [], [], [], []
    offset = 0
    for item in decodes + prefills:
        seq, start = item.seq, item.seq.num_computed_tokens + shift
        end = start + item.num_new_tokens
        input_ids += seq.token_ids[start:end]
        positions.append(np.arange(start, end))
        slots.append(pool.slots(seq.block_table, start, end))
        offset += item.num_new_tokens
        if item.samples:
            last.append(offset - 1)
            samplers.append(item)
    decode = prefill = None
    if decodes:
        context = [it.seq.num_computed_tokens + 1 + shift for it in decodes]
        decode = DecodeEntries(
            np.array(context, dtype=np.int32), [it.seq.block_table for it in decodes]
        )
    if prefills:
        prefill = PrefillEntries(
            [it.seq.num_computed_tokens for it in prefills],
            [it.num_new_tokens for it in prefills],
            [it.seq.block_table for it in prefills],
        )
    return PreparedStep(
        input_ids=mx.array(input_ids, dtype=mx.int32) if ahead is None else ahead,
        positions=mx.array(np.concatenate(positions).astype(np.int32)),
        meta=build_metadata(backend, pool, np.concatenate(slots), decode, prefill, windows),
        samplers=samplers,
        last_index=mx.array(last, dtype=mx.int32),
    )


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: mx.Dtype,
        backend: AttentionBackend | None = None,
    ):
        self.model = model
        spec = model.spec
        self.pool = PoolLayout(spec.n_kv_heads, num_blocks, block_size)
        self.backend = backend or select_backend()
        self.windows = spec.attention_windows
        shape = (spec.n_kv_heads, num_blocks * block_size, spec.head_dim)
        self.caches = [
            KVCache(mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype), block_size)
            for _ in range(spec.n_layers)
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
        try:
            return self._run(batch, look_ahead)
        except BaseException:
            self._ahead = None  # a launch fed by a failed step must never be used
            raise

    def _run(
        self, batch: list[ScheduledSeq], look_ahead: bool
    ) -> tuple[list[int], list[float] | None]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.key == _batch_key(batch, 0):
            launched = ahead.launched
            self.steps_ahead_used += 1
        else:
            self.steps_ahead_dropped += ahead is not None
            step = prepare(batch, self.pool, self.backend, windows=self.windows)
            launched = self._launch(step, 0)
        if look_ahead:
            step = prepare(batch, self.pool, self.backend, launched.tokens, self.windows)
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
