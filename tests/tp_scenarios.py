"""Tensor-parallel scenarios, each run in a process of its own by test_tensor_parallel.py:
MLX keeps one distributed group per process, and a scenario that kills or pauses a rank
must not take the test runner with it. Prints one JSON line (or exits as the engine does).

    python tests/tp_scenarios.py equal MODEL_DIR
    python tests/tp_scenarios.py kill MODEL_DIR | pause MODEL_DIR | mismatch MODEL_DIR
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import nanovllm_mlx  # noqa: F401  (the fast BLAS before mlx)
from nanovllm_mlx import LLM, SamplingParams


def workload(seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Mixed lengths (prefill and decode share steps), a shared 40-token prefix (prefix-
    cache hits), greedy and seeded sampling."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 40000, 40).tolist()
    prompts = [rng.integers(0, 40000, rng.integers(1, 70)).tolist() for _ in range(10)]
    prompts += [shared + rng.integers(0, 40000, rng.integers(1, 9)).tolist() for _ in range(4)]
    params = [
        SamplingParams(
            temperature=0.0 if i % 3 else 0.8, seed=i, max_tokens=8 + 5 * (i % 6), ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    return prompts, params


def extras(seed: int = 1) -> tuple[list[list[int]], list[SamplingParams]]:
    """What runs beside the step on rank 0: forks with copy-on-write (n > 1, a prompt that
    ends inside a block) and the prompt-logprobs pass (echo)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 40000, n).tolist() for n in (21, 37)]
    params = [
        SamplingParams(temperature=0.9, seed=7, n=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, prompt_logprobs=2, max_tokens=4, ignore_eos=True),
    ]
    return prompts, params


def choices(outs: list[dict]) -> list:
    return [
        ([c["token_ids"] for c in o["outputs"]], o.get("prompt_logprobs") is not None) for o in outs
    ]


def logprobs_close(a: list[dict | None], b: list[dict | None]) -> bool:
    """Per prompt position, the same tokens with logprobs within float32 noise (the ranks
    add their partial sums in another order than one process does)."""
    if len(a) != len(b) or a[0] is not None or b[0] is not None:
        return False
    return all(
        x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-3 for t in x)
        for x, y in zip(a[1:], b[1:])
    )


def equal(model: str, kv_cache_dtype: str = "auto") -> dict:
    prompts, params = workload()
    # A small pool (preemption) and a small step (chunked prefill). kv_cache_gb is per
    # rank: half a rank's heads per block, so half the bytes give the same blocks (a
    # quantized pool's scales are per head too; a latent cache, DeepSeek-V3's, is whole on
    # every rank: the same bytes).
    options = {
        "max_model_len": 128,
        "max_num_batched_tokens": 32,
        "max_num_seqs": 8,
        "kv_cache_dtype": kv_cache_dtype,
    }
    probe = LLM(model, kv_cache_gb=0.01, **options).engine
    spec = probe.model_runner.model.spec
    per_block = probe.kv_cache_bytes // probe.stats()["kv_blocks_total"]
    sixteen = 16 * per_block / 2**30  # 16 blocks of 16 tokens: ~3 of these sequences
    per_rank = sixteen if spec.latent_value_dim is not None else sixteen / 2
    one = LLM(model, kv_cache_gb=sixteen, **options)
    first = [o["token_ids"] for o in one.generate(prompts, params)]
    again = [o["token_ids"] for o in one.generate(prompts[-4:], params[-4:])]
    more = extras()
    forked = one.generate(*more)
    two = LLM(model, kv_cache_gb=per_rank, tensor_parallel_size=2, **options)
    got_first = [o["token_ids"] for o in two.generate(prompts, params)]
    got_again = [o["token_ids"] for o in two.generate(prompts[-4:], params[-4:])]
    got_forked = two.generate(*more)
    stats = {name: llm.stats() for name, llm in (("one", one), ("two", two))}
    two.engine.close()
    return {
        "equal": got_first == first and got_again == again,
        "forks_equal": choices(got_forked) == choices(forked),
        "prompt_logprobs_close": logprobs_close(
            forked[1]["prompt_logprobs"], got_forked[1]["prompt_logprobs"]
        ),
        "blocks": [s["kv_blocks_total"] for s in stats.values()],
        "preemptions": [s["preemptions"] for s in stats.values()],
        "prefix_hit_tokens": [s["prefix_hit_tokens"] for s in stats.values()],
        "kv_blocks_used": stats["two"]["kv_blocks_used"],
    }


def speculative(model: str) -> dict:
    """N-gram speculation on two ranks against plain decoding on one: drafts are chunks
    the workers mirror, their rejected tails trimmed on rank 0 alone."""
    rng = np.random.default_rng(2)
    prompts = [(rng.integers(0, 40000, 5).tolist() * 6)[: 24 + i] for i in range(6)]
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=40, ignore_eos=True)
        for i in range(len(prompts))
    ]
    options = {"max_model_len": 128, "kv_cache_gb": 0.01}
    one = LLM(model, **options)
    want = [o["token_ids"] for o in one.generate(prompts, params)]
    two = LLM(model, tensor_parallel_size=2, speculative="ngram", prompt_lookup_min=1, **options)
    got = [o["token_ids"] for o in two.generate(prompts, params)]
    stats = two.stats()
    two.engine.close()
    return {
        "equal": got == want,
        "accepted": stats["spec_accepted_tokens"],
        "proposed": stats["spec_draft_tokens"],
        "kv_blocks_used": stats["kv_blocks_used"],
    }


def children_of(pid: int) -> list[int]:
    me = str(pid)
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if fields.get("PPid", "").strip() == me:
            pids.append(int(status.parent.name))
    return pids


def fault(model: str, how: str) -> None:
    """Start a 2-rank engine, then kill or pause rank 1 in the middle of a long answer.
    The engine must end with one error line, never hang."""
    llm = LLM(model, kv_cache_gb=0.02, tensor_parallel_size=2, tp_timeout_s=3)
    (worker,) = children_of(os.getpid())
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    stream = llm.stream("Once upon a time", params)
    next(stream)
    os.kill(worker, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    started = time.monotonic()
    try:
        for _ in stream:
            pass
    except Exception as e:  # a dead rank: the next collective fails at once
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
        print(f"after {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps({"error": None}))


def mismatch(model: str) -> None:
    """Rank 1 started with another context length than rank 0: refused at start-up."""
    from nanovllm_mlx.parallel import group

    children_, hostfile = group.spawn(
        2, model, {"tensor_parallel_size": 2, "max_model_len": 64, "kv_cache_gb": 0.02}
    )
    os.environ.update({"MLX_RANK": "0", "MLX_HOSTFILE": hostfile})
    try:
        LLM(model, kv_cache_gb=0.02, tensor_parallel_size=2, max_model_len=128)
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
    finally:
        for child in children_:
            try:
                child.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        print(json.dumps({"worker_exit": [c.proc.returncode for c in children_]}), flush=True)


if __name__ == "__main__":
    name, model = sys.argv[1], sys.argv[2]
    if name == "equal":
        print(json.dumps(equal(model, *sys.argv[3:])))
    elif name == "speculative":
        print(json.dumps(speculative(model)))
    elif name in ("kill", "pause"):
        fault(model, name)
    elif name == "mismatch":
        mismatch(model)
