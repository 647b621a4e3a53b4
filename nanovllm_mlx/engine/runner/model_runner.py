"""Turns a scheduled batch into MLX arrays, runs the model, samples: one mx.eval a step.

A small all-decode step can run compiled (engine/runner/compiled_decode.py: which ones),
padded to a bucket of batch size and table width.

A decode step can also be built one step ahead: its input tokens are the previous step's
sampled tokens, still lazy on the device, so the host builds step t+1's graph while the
device computes step t, and launches it once step t is done there (launch.start says why
not sooner). The scheduler decides when that is safe (reserve_ahead); a launch whose
batch then changes is simply dropped.
"""

from __future__ import annotations

import time
from typing import Any, cast

import mlx.core as mx
import numpy as np

from nanovllm_mlx.attention import select_backend
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import KVFormat, resolve
from nanovllm_mlx.attention.metadata import AttentionBackend, PoolLayout
from nanovllm_mlx.attention.state import state_pools
from nanovllm_mlx.buckets import bucket
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.runner.compiled_decode import COMPILE_MAX_BATCH, CompiledDecode
from nanovllm_mlx.engine.runner.launch import Ahead, Launched, batch_key, bucket_key, start
from nanovllm_mlx.engine.runner.step_inputs import (
    PreparedStep,
    prepare,
    prepare_decode,
)
from nanovllm_mlx.engine.sample.logprobs import RowSample
from nanovllm_mlx.engine.sample.sampler import sample
from nanovllm_mlx.models.base import CausalLM
from nanovllm_mlx.sampling_params import SamplingParams

WARM_UP_RUNS = 5  # steps timed each way when the start-up chooses whether to compile


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: mx.Dtype,
        backend: AttentionBackend | None = None,
        compile_decode: bool = False,
        collective: bool = False,
        num_state_slots: int = 0,
        kv_formats: tuple[KVFormat, KVFormat] | None = None,
    ):
        self.model = model
        spec = model.spec
        # One block past those the block manager hands out: the scratch block that the
        # padding rows of a compiled decode step read and write.
        self.scratch_block = num_blocks
        self.pool = PoolLayout(spec.n_kv_heads, num_blocks + 1, block_size)
        # K and V storage (attention/kv_quant.py); default: the compute dtype.
        self.kv_formats = kv_formats or (resolve("auto", dtype), resolve("auto", dtype))
        quantized = any(f.quantized for f in self.kv_formats)
        self.value_dim = spec.latent_value_dim
        self.backend = backend or select_backend(
            latent=self.value_dim is not None,
            quantized_kv=quantized,
            sinks=spec.attention_sinks,
        )
        self.windows = spec.attention_windows  # one attention plan per distinct window
        # A compiled step's plan is full attention (plan_decode_uniform): sliding-window
        # models run eager, and so do hybrids, whose recurrent states are not a cache
        # write that a padding row could aim at the scratch block.
        self.compile_decode = compile_decode and self.windows == (None,) and not spec.state_layers
        # Tensor parallelism: every rank must finish the same all_sums in the same order
        # whatever happens after (a sampler raising on rank 0 must not leave the others
        # waiting), so each forward is evaluated whole before anything is built on it.
        self.collective = collective
        self.decode_buckets: set[tuple[Any, ...]] = set()  # (batch, table width) shapes traced
        self.compile_ms: tuple[float, float] | None = None  # warm_up's (compiled, eager) step
        slots = (num_blocks + 1) * block_size
        # MLA (value_dim set): one K pool per layer, the values inside it.
        self.caches = [
            KVCache.allocate(
                self.kv_formats, spec.n_kv_heads, slots, spec.head_dim, block_size, self.value_dim
            )
            for _ in spec.kv_layers
        ]
        self.states = state_pools(spec.state_layers, spec.state_shapes, num_state_slots, dtype)
        # The row a sequence with no slot of its own (start-up probes) reads and writes.
        self.scratch_state = num_state_slots if self.states else None
        # What the model is called with: each layer's KV pools or state pool, in order.
        kv, st = iter(self.caches), iter(self.states)
        self.layer_caches: list[Any] = [
            next(st) if i in spec.state_layers else next(kv) for i in range(spec.n_layers)
        ]
        mx.eval(self.cache_arrays())
        self._compiled = (
            CompiledDecode(model, self.backend, self.caches, self.pool)
            if self.compile_decode
            else None
        )
        self._ahead: Ahead | None = None
        self.steps_ahead_used = 0  # launched ahead and used
        self.steps_ahead_dropped = 0  # launched ahead, then the batch changed

    def cache_arrays(self) -> list[mx.array]:
        """Every pool a step writes, to evaluate with it: each layer's KV pools (codes and
        scales of a quantized cache), the tokens of in-place writes (which leave the pool
        arrays as they were) and recurrent states."""
        arrays = [a for c in self.caches for a in c.arrays()]
        arrays += [c.written for c in self.caches if c.written is not None]
        return arrays + [a for s in self.states for a in (s.conv, s.ssm)]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks' K/V, source to copy, in every layer's pools: forks'
        copy-on-write (BlockManager.take_copies); all sources are read before any copy is
        written. Done now, the device idle: MLX's scatter is in place only if no running
        step holds the pools, and the next step may start without waiting (launch.start)."""
        mx.synchronize()
        table = np.array([[src for src, _ in pairs], [dst for _, dst in pairs]], dtype=np.int32)
        src, dst = (self.pool.block_rows(table[i : i + 1]) for i in (0, 1))
        for cache in self.caches:
            cache.copy_blocks(src, dst, self.pool.n_kv_heads * self.pool.num_blocks)
        mx.eval(self.cache_arrays())

    def copy_states(self, pairs: list[tuple[int, int]]) -> None:
        """Copy recurrent-state rows, source to destination, in every recurrent layer:
        forks' states and restored prefix snapshots (StateSlots.take_copies)."""
        src = mx.array([s for s, _ in pairs], dtype=mx.int32)
        dst = mx.array([d for _, d in pairs], dtype=mx.int32)
        for state in self.states:
            state.copy(src, dst)

    def forward(self, step: PreparedStep) -> mx.array | None:
        """Lazy logits of each sampling entry's last token (None when none samples)."""
        if step.padded:
            assert self._compiled is not None
            return self._compiled(step)[: len(step.samplers)]
        hidden = self.model(step.input_ids, step.positions, self.layer_caches, step.meta)
        if self.collective:
            mx.eval(hidden, self.cache_arrays())
        if not step.samplers:
            return None
        return self.model.logits(hidden[step.last_index])

    def all_logits(self, item: ScheduledSeq) -> mx.array:
        """The logits of every token of one entry (not only its last), its K/V written:
        the prompt-logprobs pass (engine/runner/prompt_logprobs.py). Evaluated whole, as every
        forward that a tensor-parallel group runs together must be."""
        step = self._prepare_eager([item])
        hidden = self.model(step.input_ids, step.positions, self.layer_caches, step.meta)
        mx.eval(hidden, self.cache_arrays())
        return self.model.logits(hidden)

    def run_forward(self, batch: list[ScheduledSeq]) -> None:
        """The step's forward and cache writes, without logits or sampling: what the other
        ranks of a tensor-parallel group run while rank 0 samples."""
        step = self._prepare_eager(batch)
        hidden = self.model(step.input_ids, step.positions, self.layer_caches, step.meta)
        mx.eval(hidden, self.cache_arrays())

    def warm_up(self, choose: bool = False, max_rows: int = 1) -> None:
        """One decode step on the scratch block (which no sequence owns), compiled (when
        enabled) and eager, so that a first request's waits happen at start-up, as vLLM
        captures its graphs there: the trace and, on CUDA, NVRTC's kernel builds (a first
        request decoded at 15-46 tok/s on an H200 where later ones ran at ~100, 8B 4-bit).
        Then one step of each larger batch bucket up to max_rows (and COMPILE_MAX_BATCH),
        which builds kernels of its own (our 4-bit product's for its rows): a batch's first
        4-row step took 2.4 s on an H100 (benchmarks/logs/h100_llama3_8b_q4_v17_batch.log).

        choose: then time WARM_UP_RUNS more steps each way and keep compiling only if it
        was the faster: GPT-2 small's step took 2.64 ms compiled vs 3.71 eager on an H200,
        an 8B 4-bit one 9.5 vs 8.05 (benchmarks/profile_step.py)."""

        def timed(compiled: bool, runs: int, rows: int = 1) -> float:
            batch = []
            for i in range(rows):
                seq = Sequence(-1 - i, [0], SamplingParams(temperature=0.0), request_id="warm-up")
                seq.block_table = [self.scratch_block]
                batch.append(ScheduledSeq(seq, 1))
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                step = self._prepare_compiled(batch) if compiled else self._prepare_eager(batch)
                launched = self._launch(step, 0)
                mx.eval(launched.tokens, self.cache_arrays())
                times.append(time.perf_counter() - t0)
            return min(times)

        ways = [True, False] if self.compile_decode else [False]
        for compiled in ways:
            timed(compiled, 1)
        if choose and len(ways) == 2:
            compiled_ms, eager_ms = (1e3 * timed(c, WARM_UP_RUNS) for c in ways)
            self.compile_ms = (compiled_ms, eager_ms)
            self.compile_decode = compiled_ms < eager_ms
        # The buckets prepare_decode pads batches of 2 up to max_rows to (larger run eager).
        for rows in sorted({bucket(n) for n in range(2, min(max_rows, COMPILE_MAX_BATCH) + 1)}):
            timed(self.compile_decode, 1, rows)

    def _prepare(self, batch: list[ScheduledSeq], ahead: mx.array | None = None) -> PreparedStep:
        if (
            self._compiled is not None
            and self.compile_decode
            and self._compiled.takes(batch, ahead)
        ):
            return self._prepare_compiled(batch, ahead)
        return self._prepare_eager(batch, ahead)

    def _prepare_compiled(
        self, batch: list[ScheduledSeq], ahead: mx.array | None = None
    ) -> PreparedStep:
        step = prepare_decode(batch, self.pool, self.backend, self.scratch_block, ahead)
        self.decode_buckets.add(bucket_key(step))
        return step

    def _prepare_eager(
        self, batch: list[ScheduledSeq], ahead: mx.array | None = None
    ) -> PreparedStep:
        return prepare(batch, self.pool, self.backend, ahead, self.windows, self.scratch_state)

    def _launch(self, step: PreparedStep, output_offset: int) -> Launched:
        """Build the step's graph, then start it on the device once the step before it is
        done there (launch.start), without waiting for it.

        The recurrent states are rebound to this step's (lazy) results as the graph is
        built; if building it raises (the sampler refusing a row, say), they are put
        back, so that a retry of the batch's halves (isolation.py) starts from the
        states before the step, as it does from the same K/V."""
        before = [(s.conv, s.ssm) for s in self.states]
        try:
            logits = self.forward(step)
            # A speculating entry's rows sample its draft positions in turn (sampler.sample).
            seqs = [item.seq for item in step.samplers for _ in range(item.num_rows)]
            offsets = [output_offset + i for item in step.samplers for i in range(item.num_rows)]
            sampled = None if logits is None else sample(logits, seqs, offsets)
        except BaseException:
            for state, (conv, ssm) in zip(self.states, before):
                state.conv, state.ssm = conv, ssm
            raise
        del before  # no extra reference at evaluation: the pools are updated in place
        tokens, logprobs = (None, None) if sampled is None else sampled
        launched = Launched(step, tokens, logprobs)
        # Only a step whose every write bypasses MLX's scatter may start while the one
        # before it runs; recurrent states are always scattered.
        start(launched, self.cache_arrays(), wait=not (step.meta.in_place and not self.states))
        return launched

    def run(
        self, batch: list[ScheduledSeq], look_ahead: bool = False
    ) -> tuple[list[int], list[RowSample | None] | None]:
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
    ) -> tuple[list[int], list[RowSample | None] | None]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.key == batch_key(batch, 0):
            launched = ahead.launched
            self.steps_ahead_used += 1
        else:
            self.steps_ahead_dropped += ahead is not None
            launched = self._launch(self._prepare(batch), 0)
        if look_ahead:
            step = self._prepare(batch, ahead=launched.tokens)
            self._ahead = Ahead(batch_key(batch, 1), self._launch(step, 1))
        if launched.tokens is None:
            mx.eval(self.cache_arrays())
            return [], None
        # Back to batch order, which is what the scheduler's update expects.
        first, at = {}, 0
        for item in launched.step.samplers:
            first[item.seq.seq_id] = at
            at += item.num_rows
        order = [
            first[item.seq.seq_id] + i
            for item in batch
            if item.samples
            for i in range(item.num_rows)
        ]
        token_list = cast(list[int], launched.tokens.tolist())
        tokens_out = [token_list[i] for i in order]
        if launched.logprobs is None:
            return tokens_out, None
        logprob_list = launched.logprobs.tolist()
        return tokens_out, [logprob_list[i] for i in order]
