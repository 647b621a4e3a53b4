"""What the engine needs of a model runner: ModelRunner on one process, ParallelRunner
(parallel/runner.py) on rank 0 of a tensor-parallel group. Callers annotate this, so the
type checker sees both."""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx

from nanovllm_mlx.attention.metadata import PoolLayout
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.sample.logprobs import RowSample


class Runner(Protocol):
    @property
    def pool(self) -> PoolLayout: ...

    @property
    def steps_ahead_used(self) -> int: ...

    @property
    def steps_ahead_dropped(self) -> int: ...

    @property
    def decode_buckets(self) -> set[tuple[Any, ...]]: ...

    @property
    def compile_decode(self) -> bool: ...

    def run(
        self, batch: list[ScheduledSeq], look_ahead: bool = False
    ) -> tuple[list[int], list[RowSample | None] | None]: ...

    def all_logits(self, item: ScheduledSeq) -> mx.array: ...

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None: ...

    def copy_states(self, pairs: list[tuple[int, int]]) -> None: ...
