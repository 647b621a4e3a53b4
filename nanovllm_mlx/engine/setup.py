"""Building an engine's parts from its options: the model (sharded under tensor
parallelism), the KV pool sized and checked against memory, the model runner and the
step budget. What LLMEngine does once, before its first request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx

from nanovllm_mlx.attention.kv_quant import KVFormat, check_head_dim, resolve
from nanovllm_mlx.config import Config
from nanovllm_mlx.engine.core.block_manager import BlockManager
from nanovllm_mlx.engine.core.state_slots import StateSlots
from nanovllm_mlx.engine.runner import memory
from nanovllm_mlx.engine.runner.budget import PROBE_TOKENS, StepBudget, measure_step_budget
from nanovllm_mlx.engine.runner.draft_runner import DraftRunner, load_draft
from nanovllm_mlx.engine.runner.model_runner import ModelRunner
from nanovllm_mlx.engine.runner.protocol import Runner
from nanovllm_mlx.errors import TensorParallelError
from nanovllm_mlx.loading import loader
from nanovllm_mlx.models import fusion
from nanovllm_mlx.models.base import ModelSpec
from nanovllm_mlx.parallel.group import launched_rank
from nanovllm_mlx.parallel.runner import TensorParallel, fingerprint


def check_speculation(config: Config, loaded: loader.LoadedModel) -> None:
    """Speculation rolls a rejected draft back by trimming the paged KV cache; a model whose
    layers keep a recurrent state (ModelSpec.state_layers: Qwen3.5's Gated DeltaNet) would
    need that state as it was before the draft, which nothing keeps. Refused for them."""
    if config.speculative is not None and loaded.model.spec.state_layers:
        model_type = loaded.config.get("model_type")
        raise ValueError(
            f"speculative decoding is not supported for {loaded.name} (model_type "
            f"{model_type!r}): its layers keep a recurrent state that a rejected draft "
            "cannot be rolled back from; run it without --speculative"
        )


def load_model(config: Config) -> loader.LoadedModel:
    options = loader.LoadOptions(
        config.dtype, config.quantize, config.quantize_group_size, config.keep_quantized
    )
    return loader.load(config.model or None, options)


def kv_formats(config: Config, dtype: mx.Dtype) -> tuple[KVFormat, KVFormat]:
    """The K and V pools' formats from --kv-cache-dtype(-k/-v), for a model computing
    in dtype."""
    return resolve(config.kv_cache_dtype_k or "auto", dtype), resolve(
        config.kv_cache_dtype_v or "auto", dtype
    )


def max_model_len(config: Config, spec: ModelSpec) -> int:
    return min(config.max_model_len or spec.context_length, spec.context_length)


def make_config(model: str | None, kwargs: dict[str, Any]) -> Config:
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(names)}")
    return Config(model=model or "", **kwargs)


def state_slots(spec: ModelSpec, config: Config) -> StateSlots | None:
    """The recurrent-state pool's bookkeeping, for a model with recurrent layers: a slot
    per sequence that may run at once, and the prefix cache's snapshots (none when
    prefix caching is off)."""
    if not spec.state_layers:
        return None
    snapshots = config.state_snapshots
    if snapshots is None:
        snapshots = config.max_num_seqs
    if not config.enable_prefix_caching:
        snapshots = 0
    return StateSlots(config.max_num_seqs, snapshots, config.block_size)


@dataclass(slots=True)
class Parts:
    loaded: loader.LoadedModel
    max_model_len: int
    block_manager: BlockManager
    runner: Runner
    budget: StepBudget
    async_scheduling: bool
    parallel: TensorParallel | None
    kv_formats: tuple[KVFormat, KVFormat]
    kv_bytes: int  # the pools' real bytes, scales included (per rank under tensor parallelism)
    drafter: DraftRunner | None = None  # speculative "draft": the draft model
    # Wall seconds of each start-up phase (load, join, draft, pool, warm_up, budget): on an H100
    # our 8B engine started in 7.7 s where mlx-lm loads in 1.8, and loading is what both do.
    startup_s: dict[str, float] = field(default_factory=dict)
    # What a draft forward costs, as a share of a target decode step: the ratio of their
    # weights' bytes (a decode step reads every weight once).
    draft_cost: float = 0.0


def build(config: Config) -> Parts:
    parallel = None
    if config.tensor_parallel_size > 1:
        if (rank := launched_rank()) is not None and rank > 0:
            # The entry points (LLM, the CLI's commands) serve rank 0's steps on the other
            # ranks before anything else; an engine is rank 0's alone.
            raise TensorParallelError(
                f"this process is rank {rank} of a tensor-parallel group: only rank 0 builds "
                "an engine; the others serve its steps (start them through nanovllm_mlx.LLM "
                "or the nanovllm command, or call parallel.worker.serve_other_rank first)"
            )
        parallel = TensorParallel(config)
    try:
        return _assemble(config, parallel)
    except BaseException:
        if parallel is not None:
            parallel.abort()  # the caller reports the error; the other ranks end quietly
        raise


class _Laps:
    """Wall seconds between marks, by the name of the phase each mark ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now


def _assemble(config: Config, parallel: TensorParallel | None) -> Parts:
    mx.random.seed(config.seed)  # unseeded sampling is reproducible per engine
    laps = _Laps()
    loaded = load_model(config)
    check_speculation(config, loaded)
    if parallel is not None:
        parallel.shard(loaded)
    laps.mark("load")
    if parallel is None and fusion.enabled():  # shards split projections by heads
        fusion.fuse_projections(loaded.model)
        laps.mark("join")
    spec, dtype = loaded.model.spec, loaded.dtype
    context = max_model_len(config, spec)
    formats = kv_formats(config, dtype)
    for fmt in formats:
        check_head_dim(fmt, spec.head_dim)
    draft = load_draft(config, loaded, context) if config.speculative == "draft" else None
    if draft is not None:
        laps.mark("draft")
    draft_per_block = 0
    if draft is not None:
        auto = (resolve("auto", draft.dtype),) * 2
        draft_per_block = memory.kv_bytes_per_block(draft.model.spec, config.block_size, auto)
    num_blocks = memory.num_kv_blocks(spec, config, formats, context, draft_per_block)
    per_block = memory.kv_bytes_per_block(spec, config.block_size, formats)
    states = state_slots(spec, config)
    state_bytes = memory.state_bytes(spec, 0 if states is None else states.total, dtype)
    weights = loaded.weight_bytes + (0 if draft is None else draft.weight_bytes)
    per_block += draft_per_block
    memory.check_fits(num_blocks, per_block, weights, config.block_size, state_bytes)
    on_gpu, tp = mx.default_device() != mx.cpu, parallel is not None
    model_runner = ModelRunner(
        loaded.model,
        num_blocks,
        config.block_size,
        dtype,
        # Off under tensor parallelism (look-ahead too, below): the other ranks run the
        # eager forward, and their collectives must match rank 0's one for one.
        compile_decode=not tp
        and (on_gpu if config.compile_decode is None else config.compile_decode),
        collective=tp,
        num_state_slots=0 if states is None else states.total,
        kv_formats=formats,
    )
    laps.mark("pool")
    if on_gpu and not tp:
        model_runner.warm_up(config.compile_decode is None, config.max_num_seqs)
        laps.mark("warm_up")
    runner: Runner = model_runner
    if parallel is not None:
        parallel.agree(fingerprint(loaded, config, context), num_blocks)
        runner = parallel.wrap(model_runner)
    if config.max_num_batched_tokens:  # as given: tokens alone, whatever their context
        budget = StepBudget(config.max_num_batched_tokens)
    else:
        budget = measure_step_budget(
            runner,
            max(config.max_num_seqs, PROBE_TOKENS),
            context,
            layer_windows=spec.layer_windows,
            gpu=on_gpu,
        )
    laps.mark("budget")
    drafter = None
    if draft is not None:
        drafter = DraftRunner(
            draft.model, num_blocks, config.block_size, draft.dtype, budget.tokens
        )
    look_ahead = on_gpu if config.async_scheduling is None else config.async_scheduling
    # A step launched ahead and then dropped would have advanced recurrent states.
    look_ahead = look_ahead and states is None
    return Parts(
        loaded=loaded,
        max_model_len=context,
        block_manager=BlockManager(
            num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            spec.sliding_window,
            states,
        ),
        runner=runner,
        budget=budget,
        async_scheduling=look_ahead and not tp,
        parallel=parallel,
        kv_formats=formats,
        kv_bytes=num_blocks * per_block,
        drafter=drafter,
        draft_cost=0.0 if draft is None else draft.weight_bytes / loaded.weight_bytes,
        startup_s=laps.seconds,
    )
