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
from nanovllm_mlx.attention.metadata import AttentionBackend, AttentionMetadata
from nanovllm_mlx.engine.runner.step_inputs import PreparedStep
from nanovllm_mlx.models.base import CausalLM


class CompiledDecode:
    """Runs padded decode steps through one mx.compile'd function over these caches."""

    def __init__(self, model: CausalLM, backend: AttentionBackend, caches: list[KVCache]):
        self.model, self.backend, self.caches = model, backend, caches
        self._compiled: Any = mx.compile(self._graph)

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
