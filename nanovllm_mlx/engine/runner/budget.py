"""How many tokens one step may compute: measured on this device at start-up.

The step is the unit of everything the engine does between two looks at the world: a
decode waits for the whole step it rides in, and an abort or a Ctrl-C is seen only after
it. A fixed 4,096-token budget made a 2,000-token prompt one 145 s step on a 2-core CPU
(every running stream froze that long), while a GPU computes it in milliseconds. So the
budget is what the device prefills in about TARGET_STEP_S, between a floor that keeps
decode batches whole and the configured cap. Where time bounds it, a third probe measures
what attending to cached keys adds to a prompt token's cost, so that late chunks of a long
prompt are cut shorter and keep the step near its target (Scheduler._chunk).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nanovllm_mlx.engine.core.chunk_cost import keys_read
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.runner.protocol import Runner
from nanovllm_mlx.sampling_params import SamplingParams

TARGET_STEP_S = 0.25  # a step this long keeps streams smooth and Ctrl-C prompt
DEFAULT_CAP = 4096  # GPUs reach it: beyond, prefill throughput gains little
PROBE_TOKENS = 16
# Cached keys behind the key-cost probe's tokens. On 2 CPU cores (SmolLM2-135M, float32)
# 16 tokens took 0.185 s after no keys, 0.264 s after 496 and 0.351 s after 1,008: linear,
# so one probe of 0.26 s gives the slope. On a GPU a 16-token step is launches and weight
# reads: on an H100 (Llama-3-8B shape, 4-bit) 496 keys added less than its jitter (0.56
# ms in one sample, ~0 in the next three), and that jitter taken for a key cost cut a
# 16k-token prompt's late chunks to a few hundred tokens (TTFT 8.6 s against mlx-lm's
# 2.0). So a GPU whose small step is far below the target probes with the larger prefill
# it has already timed, after KEY_PROBE_KEYS keys, where they add several milliseconds.
# A CPU keeps the small probe: its 16 tokens are compute already, and a larger prefill
# after 8,192 keys took 1.9 s on 2 cores (SmolLM2-135M).
KEY_PROBE_CONTEXT = 512
KEY_PROBE_KEYS = 8192


@dataclass(frozen=True, slots=True)
class StepBudget:
    tokens: int  # a step's budget, in tokens at no context
    key_cost: float = 0.0  # what each cached key adds to a prompt token's cost, in tokens


def _prefill_seconds(runner: Runner, n: int, context: int = 0) -> float:
    """Time of one n-token prefill step after `context` cached tokens. It writes K/V into
    the first blocks of the pool, which hold nothing anyone reads (nothing is cached
    before the first request); the context's keys are whatever earlier probes left
    there, which cost the same to read."""
    bs = runner.pool.block_size
    seq = Sequence(
        -1, [1] * (context + n), SamplingParams(temperature=0.0), request_id="budget-probe"
    )
    seq.block_table = list(range(-(-(context + n) // bs)))
    t0 = time.perf_counter()
    runner.run([ScheduledSeq(seq, n, start=context)])
    return time.perf_counter() - t0


def measure_step_budget(
    runner: Runner,
    floor: int,
    max_model_len: int,
    cap: int = DEFAULT_CAP,
    layer_windows: tuple[int | None, ...] = (),
    gpu: bool = False,
) -> StepBudget:
    """Tokens a step may compute so that it takes about TARGET_STEP_S here.

    Probes run twice each (the first run of a shape pays for kernel compilation, which
    every engine pays once anyway): a small prefill bounds the cost per token; if that
    allows more than a few dozen tokens, a prefill near the estimate separates the
    per-step overhead from the per-token cost. If the budget is then below the cap (time
    binds it), the small prefill once more after KEY_PROBE_CONTEXT cached keys (on a GPU
    that timed the larger one: that, after KEY_PROBE_KEYS) gives the key cost. Costs
    about 4 x TARGET_STEP_S on a slow device, a fraction of a second on a GPU. gpu: the
    device is one (probes of new shapes then run twice, the first building kernels)."""
    floor = min(floor, cap)
    slots = runner.pool.num_blocks * runner.pool.block_size
    if slots < cap:
        cap = max(floor, slots)
    if max_model_len <= 4 * PROBE_TOKENS:
        return StepBudget(max(floor, min(cap, max_model_len)))
    _prefill_seconds(runner, PROBE_TOKENS)
    small = _prefill_seconds(runner, PROBE_TOKENS)
    per_token = small / PROBE_TOKENS  # overhead included: an upper bound
    estimate = int(TARGET_STEP_S / max(small, 1e-9) * PROBE_TOKENS)
    n, base, wanted = PROBE_TOKENS, small, KEY_PROBE_CONTEXT - PROBE_TOKENS
    if estimate > 4 * PROBE_TOKENS:  # a small step is far below the target: time more
        # One sequence, so no longer than the context: positions past it are garbage.
        large_n = min(estimate, cap, max_model_len)
        # A new shape, whose first run may build kernels (GPU): the faster of two runs, as
        # the key probe takes, so that the two compare alike.
        large = min(_prefill_seconds(runner, large_n) for _ in range(2))
        per_token = max((large - small) / (large_n - PROBE_TOKENS), 1e-9)
        overhead = max(small - per_token * PROBE_TOKENS, 0.0)
        estimate = int(max(TARGET_STEP_S - overhead, 0.0) / per_token)
        if gpu:
            n, base, wanted = large_n, large, KEY_PROBE_KEYS
    tokens = max(floor, min(cap, estimate))
    context = min(wanted, max_model_len - n, slots - n)
    if tokens >= cap or context < 4 * PROBE_TOKENS:
        return StepBudget(tokens)
    # Once on a CPU, where nothing compiles for a new size (0.26 s of start-up on 2
    # cores); on a GPU the first run may build kernels for the new shapes.
    runs = 2 if gpu else 1
    late = min(_prefill_seconds(runner, n, context) for _ in range(runs))
    keys = keys_read(context, layer_windows)  # what the Scheduler charges for
    key_cost = max(late - base, 0.0) / (n * keys * max(per_token, 1e-9))
    return StepBudget(tokens, key_cost)
