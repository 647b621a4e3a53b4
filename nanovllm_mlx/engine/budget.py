"""How many tokens one step may compute: measured on this device at start-up.

The step is the unit of everything the engine does between two looks at the world: a
decode waits for the whole step it rides in, and an abort or a Ctrl-C is seen only after
it. A fixed 4,096-token budget made a 2,000-token prompt one 145 s step on a 2-core CPU
(every running stream froze that long), while a GPU computes it in milliseconds. So the
budget is what the device prefills in about TARGET_STEP_S, between a floor that keeps
decode batches whole and the configured cap.
"""

from __future__ import annotations

import time

from nanovllm_mlx.engine.model_runner import ModelRunner
from nanovllm_mlx.engine.scheduler import ScheduledSeq
from nanovllm_mlx.engine.sequence import Sequence
from nanovllm_mlx.sampling_params import SamplingParams

TARGET_STEP_S = 0.25  # a step this long keeps streams smooth and Ctrl-C prompt
DEFAULT_CAP = 4096  # GPUs reach it: beyond, prefill throughput gains little
PROBE_TOKENS = 16


def _prefill_seconds(runner: ModelRunner, n: int) -> float:
    """Time of one n-token prefill step. It writes K/V into the first blocks of the pool,
    which hold nothing yet (nothing is cached before the first request)."""
    bs = runner.pool.block_size
    seq = Sequence(-1, [1] * n, SamplingParams(temperature=0.0), request_id="budget-probe")
    seq.block_table = list(range(-(-n // bs)))
    t0 = time.perf_counter()
    runner.run([ScheduledSeq(seq, n)])
    return time.perf_counter() - t0


def measure_step_budget(
    runner: ModelRunner, floor: int, max_model_len: int, cap: int = DEFAULT_CAP
) -> int:
    """Tokens a step may compute so that it takes about TARGET_STEP_S here.

    Two probes, each run twice (the first run of a shape pays for kernel compilation,
    which every engine pays once anyway): a small prefill bounds the cost per token; if
    that allows more than a few dozen tokens, a prefill near the estimate separates the
    per-step overhead from the per-token cost. Costs about 3 x TARGET_STEP_S on a slow
    device, milliseconds on a GPU."""
    floor = min(floor, cap)
    if runner.pool.num_blocks * runner.pool.block_size < cap:
        cap = max(floor, runner.pool.num_blocks * runner.pool.block_size)
    if max_model_len <= 4 * PROBE_TOKENS:
        return max(floor, min(cap, max_model_len))
    _prefill_seconds(runner, PROBE_TOKENS)
    small = _prefill_seconds(runner, PROBE_TOKENS)
    estimate = int(TARGET_STEP_S / max(small, 1e-9) * PROBE_TOKENS)
    if estimate > 4 * PROBE_TOKENS:
        # One sequence, so no longer than the context: positions past it are garbage.
        n = min(estimate, cap, max_model_len)
        _prefill_seconds(runner, n)  # a new shape: kernels compile on its first run (GPU)
        large = _prefill_seconds(runner, n)
        per_token = max((large - small) / (n - PROBE_TOKENS), 1e-9)
        overhead = max(small - per_token * PROBE_TOKENS, 0.0)
        estimate = int(max(TARGET_STEP_S - overhead, 0.0) / per_token)
    return max(floor, min(cap, estimate))
