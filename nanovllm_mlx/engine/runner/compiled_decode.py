"""The compiled decode step: the decode forward as a function of arrays alone, traced by
`mx.compile` once per bucket of batch size and table width (engine/step_inputs.
prepare_decode pads a batch to its bucket) and replayed after, so the Python that builds
a step's graph runs once per bucket instead of once per token, and MLX fuses the
elementwise ops between the kernels. The eager forward (ModelRunner.forward) is the
reference it is tested against (tests/test_compiled_decode.py)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.metadata import AttentionBackend, AttentionMetadata, PoolLayout
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.runner.step_inputs import (
    PreparedStep,
    decode_entries,
    is_uniform_decode,
)
from nanovllm_mlx.models.base import CausalLM

# Decode batches up to this size run compiled. Measured on an H200 (GPT-2 small, float16,
# benchmarks/logs/h200_profile_gpt2_small_f16_v5_*.log): one stream's step went from 3.71
# to 2.64 ms compiled; a 32-request run's decode steps from 4.83 to 7.12 ms, because each
# new (batch, width) bucket costs a trace (~90 ms) while a wide step is bound by the device,
# not by the Python that builds it.
COMPILE_MAX_BATCH = 8
# K/V bytes a step of a lone sequence would gather compiled, past which it runs eager if
# the backend reads it in place there (the gather path's slice of consecutive blocks). On
# an H100 with the kernel off (8B 4-bit), one stream after 8,192 tokens (1 GiB of K/V)
# ran at 120.7 tok/s eager against 53.6 compiled. Below: eager builds each step's graph
# anew (~1 ms more host time a step at 8B: benchmarks/RESULTS.md, v10's anatomy), what
# MLX's gather of ~64 MiB costs (~190 GB/s on an H100: attention/cuda.py). (After 32
# tokens eager won too, 157.0 to 139.2, but there CUDA's SDPA took the compiled step's
# mask down its unfused path, which Metal's one-query kernel does not.)
EAGER_READ_BYTES = 64 << 20


class CompiledDecode:
    """Runs padded decode steps through one mx.compile'd function over these caches."""

    def __init__(
        self, model: CausalLM, backend: AttentionBackend, caches: list[KVCache], pool: PoolLayout
    ):
        self.model, self.backend, self.caches, self.pool = model, backend, caches, pool
        slots = pool.num_blocks * pool.block_size
        self.kv_bytes_per_slot = sum(a.nbytes for c in caches for a in c.arrays()) / slots
        self._compiled: Any = mx.compile(self._graph)

    def takes(self, batch: list[ScheduledSeq], ahead: mx.array | None = None) -> bool:
        """Whether a step runs compiled: an all-decode batch of up to COMPILE_MAX_BATCH,
        unless it is one the backend reads in place only eager, past EAGER_READ_BYTES."""
        if len(batch) > COMPILE_MAX_BATCH or not is_uniform_decode(batch):
            return False
        entries = decode_entries(batch, ahead)
        gathered = int(entries.context_lens.max()) * self.kv_bytes_per_slot
        return gathered < EAGER_READ_BYTES or not self.backend.reads_in_place(entries, self.pool)

    def __call__(self, step: PreparedStep) -> mx.array:
        """Lazy logits of every row of the padded step (padding rows included); the
        caches are rebound to the written pools."""
        pools = [c.arrays() for c in self.caches]
        out: tuple[mx.array, list[list[mx.array]]] = self._compiled(
            step.input_ids, step.positions, step.meta.write_rows, step.meta.decode, pools
        )
        logits, pools = out
        for cache, arrays in zip(self.caches, pools):
            cache.set_arrays(arrays)
        return logits

    def _graph(
        self,
        input_ids: mx.array,
        positions: mx.array,
        write_rows: mx.array,
        plan: dict[str, mx.array],
        pools: list[list[mx.array]],
    ) -> tuple[mx.array, list[list[mx.array]]]:
        """Pools in, the written pools out (the pools passed in have no other reference
        once the caller rebinds them, so MLX still writes them in place). In-place writes
        (attention/cuda_write.py) leave them as they came, their effect ordered by the
        tokens the trace's own caches hold."""
        caches = [c.with_arrays(arrays) for c, arrays in zip(self.caches, pools)]
        meta = AttentionMetadata(self.backend, write_rows, input_ids.shape[0], decode=plan)
        hidden = self.model(input_ids, positions, caches, meta)
        return self.model.logits(hidden), [c.arrays() for c in caches]
