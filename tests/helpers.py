"""Helpers shared by the test modules: the logits spy, prompt builders, engine sizes and the
command line's argv. Import as ``from helpers import ...`` (conftest puts tests/ on the path).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

import nanovllm_mlx.engine.model_runner as model_runner
from nanovllm_mlx import LLM, SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent

# A few thousand blocks: fast to allocate, and more than any test here needs. A test that
# wants preemption sizes its own pool.
SMALL_KV_GB = 0.05
SMALL_KV = {"kv_cache_gb": SMALL_KV_GB}  # LLM / create_app keyword
SMALL_KV_ARGS = ["--kv-cache-gb", str(SMALL_KV_GB)]  # the same on the command line


def random_ids(n: int, seed: int = 0) -> list[int]:
    """n seeded token ids, all below 50000: inside the GPT-2 vocabulary the fixtures share."""
    return np.random.default_rng(seed).integers(0, 50000, n).tolist()


@contextlib.contextmanager
def captured_logits() -> Iterator[list[np.ndarray]]:
    """Inside the block, every batch of logits the engine samples from is appended (as
    float32 numpy, one row per sampling sequence) to the list this yields.

    This is the one place that knows the engine's seam: ModelRunner calls the module-level
    name ``model_runner.sample``. When the engine moves sampling, only this changes.
    """
    seen: list[np.ndarray] = []
    real = model_runner.sample

    def spy(logits: mx.array, *args: Any, **kwargs: Any) -> Any:
        seen.append(np.array(logits.astype(mx.float32)))
        return real(logits, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(model_runner, "sample", spy)
        yield seen


@contextlib.contextmanager
def captured_logits_by_seq() -> Iterator[dict[int, list[np.ndarray]]]:
    """Like captured_logits, but each sequence's rows apart: seq_id -> the logits of every
    token it sampled, in order (a batched run's rows come in the engine's own order)."""
    seen: dict[int, list[np.ndarray]] = {}
    real = model_runner.sample

    def spy(logits: mx.array, seqs: list, *args: Any, **kwargs: Any) -> Any:
        rows = np.array(logits.astype(mx.float32))
        for seq, row in zip(seqs, rows):
            seen.setdefault(seq.seq_id, []).append(row)
        return real(logits, seqs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(model_runner, "sample", spy)
        yield seen


def check_batched_parity(
    path: Path, prompts: list[list[int]], steps: int, atol: float = 1e-4, **engine: Any
) -> None:
    """check_parity for several prompts run as one continuous batch (engine: options such
    as a small max_num_batched_tokens, so prefills are chunked and share steps with
    decodes): every sequence's prefill and decode logits, and its greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLM(str(path), dtype="float32", **{**SMALL_KV, **engine})
    greedy = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    with captured_logits_by_seq() as seen:
        outs = llm.generate(prompts, greedy)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert sorted(seen) == list(range(len(prompts)))  # seq ids follow the prompts' order
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + out["token_ids"]])).logits[0].numpy()
        assert len(seen[i]) == steps
        for step, logits in enumerate(seen[i]):
            np.testing.assert_allclose(
                logits,
                ref[len(prompt) - 1 + step],
                atol=atol,
                rtol=1e-4,
                err_msg=f"prompt {i}, step {step}",
            )
        assert out["token_ids"] == ref[len(prompt) - 1 : -1].argmax(-1).tolist(), f"prompt {i}"


def check_parity(path: Path, prompt: list[int], steps: int, atol: float = 1e-4) -> None:
    """The engine in float32 against transformers on the whole sequence: the prefill's and
    every decode step's logits within atol (+1e-4 relative), and the same greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLM(str(path), dtype="float32", **SMALL_KV)
    greedy = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    with captured_logits() as seen:
        out = llm.generate([prompt], greedy)[0]
    assert len(seen) == steps
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out["token_ids"]])).logits[0].numpy()
    for step, logits in enumerate(seen):  # step 0 is the prefill
        np.testing.assert_allclose(
            logits[0], ref[len(prompt) - 1 + step], atol=atol, rtol=1e-4, err_msg=f"step {step}"
        )
    assert out["token_ids"] == ref[len(prompt) - 1 : -1].argmax(-1).tolist()


def spawn_cli(*args: str, width: int = 120, timeout: float = 60) -> Any:
    """The `nanovllm` command in a pseudo-terminal (pexpect), colours and all: what a
    person at a terminal sees."""
    import pexpect

    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    argv = cli_argv(*args)
    return pexpect.spawn(
        argv[0],
        argv[1:],
        cwd=str(REPO_ROOT),
        encoding="utf-8",
        dimensions=(40, width),
        timeout=timeout,
        env={**env, "TERM": "xterm-256color"},
    )


SLOW_BLAS_NOTICE = "note: MLX's slow reference BLAS is in use"


def without_blas_notice(stderr: str) -> str:
    """stderr less the slow-BLAS notice, which a machine with no fast BLAS (Linux aarch64
    without OpenBLAS) adds to every command that loads a model; test_blas.py checks it."""
    lines = stderr.splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith(SLOW_BLAS_NOTICE))


def cli_argv(*args: str) -> list[str]:
    """The `nanovllm` command as a child process's argv. Run it with cwd=REPO_ROOT: ``-m``
    puts the working directory first on sys.path, so this checkout's code runs, not an
    installed copy."""
    return [sys.executable, "-m", "cli.main", *args]
