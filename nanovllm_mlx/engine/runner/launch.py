"""A step on its way to the device: what was launched (lazy tokens and pools), the step
launched ahead of its turn and the batch it is right for, and the one rule for starting
a step (after the device has finished the one before it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.runner.step_inputs import PreparedStep
from nanovllm_mlx.engine.sample.logprobs import SampleExtras


@dataclass(slots=True)
class Launched:
    step: PreparedStep
    tokens: mx.array | None  # lazy, in the step's sampler order
    logprobs: SampleExtras | None  # lazy; tolist() reads it back, one RowSample a row


@dataclass(slots=True)
class Ahead:
    key: tuple[Any, ...]  # the batch, as batch_key, this launch is the right step for
    launched: Launched


def start(launched: Launched, pools: list[mx.array], wait: bool = True) -> None:
    """Launch a built step and the pools it writes, after the device has finished
    everything before it (wait), or at once for a step that writes its pools in place
    (attention/cuda_write.py), which MLX neither donates nor copies.

    A step writes its K/V into the pools, which MLX does in place only if nothing else
    holds them, and MLX holds every array a launched kernel reads until the device has
    run it: a step launched while the previous one still runs (the look-ahead) finds its
    pools held by that step's attention reads, and MLX then copies each pool whole
    before writing one token into it. On CPU that took a compiled single stream from 475
    to 3.5 tok/s with a 2 GB pool (tiny Llama, 2 layers); on an H100, Llama-3-8B's shape
    in 4 bits with a 20 GB pool decoded at 92.4 / 71.9 tok/s after 32 / 8,192 prompt
    tokens that way and at 149.4 / 110.0 with this wait (benchmarks/RESULTS.md, round
    three). mx.synchronize() waits until the device and MLX's completion handlers are
    done (waiting for the previous tokens alone may return before MLX lets go of its
    arrays); the look-ahead still builds the next step's graph while the device runs,
    only its launch waits."""
    if wait:
        mx.synchronize()
    outputs: list[Any] = [pools]
    if launched.tokens is not None:
        outputs.append(launched.tokens)
    if launched.logprobs is not None:
        outputs.append(launched.logprobs)
    mx.async_eval(*outputs)  # type: ignore[no-untyped-call]


def batch_key(batch: list[ScheduledSeq], shift: int) -> tuple[Any, ...]:
    return tuple(
        (item.seq.seq_id, item.start + shift, item.num_new_tokens, len(item.draft))
        for item in batch
    )


def bucket_key(step: PreparedStep) -> tuple[Any, ...]:
    return (step.input_ids.shape[0], *(a.shape for a in step.meta.decode.values()))
