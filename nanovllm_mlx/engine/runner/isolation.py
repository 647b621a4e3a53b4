"""A step that raises is narrowed down to the sequences that cause it.

One request must never fail everyone: a parameter the sampler cannot handle, a prompt
that trips a kernel. When the model runner raises on a batch, the batch is split in
halves and each half is run again, recursively, until the sequences that fail alone are
found; only those fail. A failure that no single sequence causes (one that only the whole
batch hits) ends with every half succeeding, so nobody fails. Re-running writes the same
K/V into the same slots, so the retries leave the cache as a clean run would.
"""

from __future__ import annotations

import logging

from nanovllm_mlx.engine.core.plan import ScheduledSeq, StepResult
from nanovllm_mlx.engine.runner.protocol import Runner
from nanovllm_mlx.engine.sample.logprobs import RowSample
from nanovllm_mlx.errors import TensorParallelError

logger = logging.getLogger("nanovllm_mlx.engine")


def run_isolating(runner: Runner, batch: list[ScheduledSeq], look_ahead: bool) -> StepResult:
    """The batch's tokens, one per sampling entry that did not fail, in batch order."""
    try:
        tokens, logprobs = runner.run(batch, look_ahead)
        return StepResult(tokens, logprobs)
    except TensorParallelError:
        raise  # a rank is gone: no request caused it, and no retry can succeed
    except Exception as e:
        logger.warning("a step of %d sequences failed (%r); isolating the cause", len(batch), e)
        result = _bisect(runner, batch, e)
        for item, error in result.failed:
            logger.error("request %s failed: %s", item.seq.request_id, error)
        return result


def _bisect(runner: Runner, batch: list[ScheduledSeq], error: Exception) -> StepResult:
    if len(batch) == 1:
        message = f"the engine failed on this request: {error!r}"
        return StepResult([], None, [(batch[0], message)])
    mid = len(batch) // 2
    parts = []
    for half in (batch[:mid], batch[mid:]):
        try:
            tokens, logprobs = runner.run(half)
            parts.append(StepResult(tokens, logprobs))
        except TensorParallelError:
            raise
        except Exception as e:
            parts.append(_bisect(runner, half, e))
    return _merge(parts)


def _merge(parts: list[StepResult]) -> StepResult:
    merged = StepResult([], None)
    want_logprobs = any(p.logprobs is not None for p in parts)
    logprobs: list[RowSample | None] = []
    for p in parts:
        merged.tokens += p.tokens
        merged.failed += p.failed
        # A half with no row asking for extras has none: no row of it reads them.
        logprobs += p.logprobs if p.logprobs is not None else [None] * len(p.tokens)
    merged.logprobs = logprobs if want_logprobs else None
    return merged
