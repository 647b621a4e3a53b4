"""Helpers shared by the test modules: the logits spy, prompt builders, engine sizes, the
command line's argv, the server run for real, and the scheduler's invariants. Import as
``from helpers import ...`` (conftest puts tests/ on the path); no test module imports
another (GGUF writing is in gguf_files.py, fixtures in conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import numpy as np
import pytest

import nanovllm_mlx.engine.runner.model_runner as model_runner
from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention import cuda_decode
from nanovllm_mlx.attention.attend import gathered_attention
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import INT4, INT8, KVFormat
from nanovllm_mlx.attention.metadata import PoolLayout
from nanovllm_mlx.engine.core.scheduler import Scheduler
from nanovllm_mlx.engine.core.sequence import SequenceStatus

REPO_ROOT = Path(__file__).resolve().parent.parent

# A few thousand blocks: fast to allocate, and more than any test here needs. A test that
# wants preemption sizes its own pool.
SMALL_KV_GB = 0.05
SMALL_KV = {"kv_cache_gb": SMALL_KV_GB}  # LLM / create_app keyword
SMALL_KV_ARGS = ["--kv-cache-gb", str(SMALL_KV_GB)]  # the same on the command line


def dense(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    start: int,
    window: int | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Causal attention of queries q [n, H, D] at positions start.. over keys k/v [T, Hkv,
    D] at 0.. (the last `window` of them), in float64 -> [n, H * D]; GQA by repetition.
    sinks [H]: one more logit per head in each softmax, whose weight is dropped
    (transformers' gpt-oss eager attention)."""
    n, n_heads, head_dim = q.shape
    rep = n_heads // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    out = np.empty((n, n_heads, v.shape[-1]), dtype=np.float64)
    for i in range(n):
        p = start + i
        lo = 0 if window is None else max(0, p - window + 1)
        s = np.einsum("hd,thd->ht", q[i], k[lo : p + 1]) / np.sqrt(head_dim)
        if sinks is not None:
            s = np.concatenate([s, sinks[:, None]], axis=-1)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        if sinks is not None:
            w = w[:, :-1]
        out[i] = np.einsum("ht,thd->hd", w, v[lo : p + 1])
    return out.reshape(n, -1)


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
    path: Path,
    prompts: list[list[int]],
    steps: int,
    atol: float = 1e-4,
    hf_class: Any = None,
    **engine: Any,
) -> None:
    """check_parity for several prompts run as one continuous batch (engine: options such
    as a small max_num_batched_tokens, so prefills are chunked and share steps with
    decodes): every sequence's prefill and decode logits, and its greedy tokens.
    hf_class: the transformers class to compare with (default AutoModelForCausalLM)."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLM(str(path), dtype="float32", **{**SMALL_KV, **engine})
    greedy = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    with captured_logits_by_seq() as seen:
        outs = llm.generate(prompts, greedy)
    hf = (hf_class or AutoModelForCausalLM).from_pretrained(str(path), dtype=torch.float32)
    hf.eval()
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


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process, stdout and stderr piped, env added to ours."""
    return subprocess.run(
        cli_argv(*args),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def small_bench(model: Path, *args: str) -> dict:
    """`nanovllm bench --json` on two short requests in a small pool: its result record."""
    sizes = ("--min-input", "8", "--max-input", "16", "--min-output", "8", "--max-output", "16")
    proc = run_cli(
        "bench", "-m", str(model), *args, "--num-seqs", "2", *sizes,
        "--json", "--kv-cache-gb", "0.05",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The server, run for real (uvicorn on a loopback port) ------------------------------

MODEL = "gpt2-tiny"  # the fixture's directory name is the served model name
JSON = {"Content-Type": "application/json"}


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve app on 127.0.0.1 (a port bound here, so no race for it) until the block ends."""
    import uvicorn  # here: the GPU machine runs the engine's tests without the server's packages

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)
    }


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    return error


# The scheduler with a fake model ------------------------------------------------------

EOS = 0  # the token id the scheduler tests treat as end of sequence


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    refs = [0] * bm.num_blocks
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        # The slot of the token sampled last step is allocated when it is scheduled.
        needed = bm.blocks_needed(s.num_tokens)
        assert needed - 1 <= len(s.block_table) <= needed
        for b in s.block_table:
            refs[b] += 1
    for s in sched.waiting:
        assert s.block_table == []
    for b in bm.pool.blocks:
        assert b.ref_count == refs[b.block_id]
        assert (b.ref_count == 0) == (b.block_id in bm.pool.free_ids)


def check_dequantized_twin(
    quantized: Any,
    path: str | Path,
    layers: dict[str, Any],
    prompts: list[list[int]],
    **options: Any,
) -> None:
    """`quantized` (an LLM quantized at load, group 32, 4 bits) gives the logits of the float
    model at `path` holding its layers' dequantized weights: one greedy step of `prompts`."""
    import mlx.nn as nn
    import numpy as np

    from nanovllm_mlx import LLM, SamplingParams

    one = SamplingParams(temperature=0.0, max_tokens=1)
    with captured_logits() as seen:
        quantized.generate(prompts, one)
    exact = LLM(str(path), **options)
    exact.engine.model_runner.model.update(
        nn.utils.tree_unflatten(
            [
                (f"{p}.weight", mx.dequantize(m.weight, m.scales, m.biases, 32, 4))
                for p, m in layers.items()
            ]
        )
    )
    with captured_logits() as want:
        exact.generate(prompts, one)
    np.testing.assert_allclose(np.concatenate(seen), np.concatenate(want), atol=1e-4)


def random_tables(
    rng: np.random.Generator, contexts: list[int], block_size: int, num_blocks: int
) -> np.ndarray:
    """[B, nb] block tables over distinct random blocks, each context's blocks filled (the
    rest 0), as the decode kernels' tests read them."""
    nb = -(-max(contexts) // block_size)
    free = list(rng.permutation(num_blocks))
    tables = np.zeros((len(contexts), nb), dtype=np.int32)
    for i, c in enumerate(contexts):
        tables[i, : -(-c // block_size)] = [free.pop() for _ in range(-(-c // block_size))]
    return tables


def decode_mask(contexts: list[int], n_keys: int, window: int | None) -> np.ndarray:
    """[B, 1, n_keys]: the keys each decode query sees (its last `window` of them)."""
    keys, ctx = np.arange(n_keys)[None, :], np.array(contexts)[:, None]
    return ((keys < ctx) & (keys >= (0 if window is None else ctx - window)))[:, None, :]


def filled_cache(
    formats: tuple[KVFormat, KVFormat], n_kv: int, blocks: int, bs: int, d: int, seed: int = 0
) -> tuple[KVCache, PoolLayout]:
    """Every slot written with random rows; keys carry a few large channels, as real keys
    do (what the formats' Hadamard turn is for)."""
    rng = np.random.default_rng(seed)
    cache = KVCache.allocate(formats, n_kv, blocks * bs, d, bs)
    layout = PoolLayout(n_kv, blocks, bs)
    k = rng.standard_normal((blocks * bs, n_kv, d)).astype(np.float32)
    k[..., :3] *= 12.0
    v = rng.standard_normal((blocks * bs, n_kv, d)).astype(np.float32)
    cache.write(mx.array(k), mx.array(v), layout.write_rows(np.arange(blocks * bs)))
    mx.eval(cache.arrays())
    return cache, layout


def kernel_and_gather(
    q: mx.array,
    cache: KVCache,
    tables: np.ndarray,
    contexts: list[int],
    window: int | None,
    reference: KVCache | None = None,
    **kernel: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """attention/cuda_decode.py's paged_decode of q [B, H, D] over cache (its block tables and
    context lengths; `kernel`: paged_decode's benchmark knobs, or capacity=True to launch
    as a compiled step does, knowing only the tables' width), and the gather path's on
    the CPU in float32 over `reference` (default: the same cache), as float32 arrays."""
    bs, n_kv = cache.block_size, cache.k.shape[0]
    scale = q.shape[-1] ** -0.5
    got = cuda_decode.paged_decode(
        q,
        cache.k,
        cache.v,  # type: ignore[arg-type]
        mx.array(tables),
        mx.array(contexts, dtype=mx.int32),
        bs,
        scale,
        tables.shape[1] * bs if kernel.get("capacity") else max(contexts),
        window,
        k_scales=cache.k_scales,
        v_scales=cache.v_scales,
        formats=cache.formats,
        **kernel,
    )
    mask = decode_mask(contexts, tables.shape[1] * bs, window)
    rows = PoolLayout(n_kv, cache.k.shape[1] // bs, bs).block_rows(tables)
    with mx.stream(mx.cpu):
        want = gathered_attention(
            q.astype(mx.float32)[:, None], reference or cache, rows, mx.array(mask), scale
        )[:, 0]
        mx.eval(want)
    return np.array(got.astype(mx.float32)), np.array(want)


# Speculative decoding (tests/test_speculative.py, tests/test_speculative_draft.py) -------

# Prompts the tiny random Qwen3 continues partly in loops; with n-grams from 1 token,
# lookups find drafts, and both accepted and rejected tokens occur.
SPEC_PATTERNS = [(random_ids(5, seed=s) * 6)[: 24 + s] for s in range(6)] + [
    random_ids(30, seed=40),
    random_ids(9, seed=41) * 3,
]


def seeded_forks() -> SamplingParams:
    """Seeded sampling, three choices a prompt, with logprobs: whose tokens speculation
    must not change (a draft is kept where the draw at its position equals it)."""
    return SamplingParams(
        temperature=0.8,
        top_k=40,
        seed=7,
        n=3,
        max_tokens=30,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=2,
    )


def choice_ids(results: list[dict]) -> list[list[list[int]]]:
    """Each request's choices' token ids, in order."""
    return [[c["token_ids"] for c in r["outputs"]] for r in results]


def metrics_after_completion(base_url: str, prompt: list[int], model: str) -> dict[str, float]:
    """/metrics once a greedy 30-token completion of prompt has been served."""
    body = {"model": model, "prompt": prompt, "max_tokens": 30, "temperature": 0}
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers=JSON, timeout=60)
    assert r.status_code == 200, r.text
    return metrics(base_url)


# The KVFormat layouts the kernels' tests run beside int8 and int4 (kv_quant.py describes
# them; no flag selects them).
A8 = KVFormat("a8", bits=8, group=64, affine=True)  # affine int8 in groups of 64
S4 = KVFormat("s4", bits=4)  # symmetric int4, one scale a row
S8 = KVFormat("s8", bits=8, group=32)  # symmetric int8, four scales a 128-wide row
KV_FORMATS = {"int8": INT8, "int4": INT4, "a8": A8, "s4": S4, "s8": S8}
