"""In-place K/V writes (attention/cuda_write.py): which steps write in place, that only
those start without waiting for the step before them, that the kernel writes what MLX's
scatter writes (on the host anywhere, tests/cuda_host.py; on CUDA), and, on CUDA, that
the decode kernel reads it after the write and that an engine decodes the same tokens
with it as without it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from cuda_host import on_the_host
from helpers import SMALL_KV

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention import cuda_decode, cuda_write
from nanovllm_mlx.attention.cuda_write import write_in_place
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.metadata import (
    AttentionMetadata,
    DecodeEntries,
    PoolLayout,
    PrefillEntries,
)
from nanovllm_mlx.attention.paged import build_metadata
from nanovllm_mlx.engine.runner import model_runner

CUDA = pytest.mark.skipif(not cuda_attention.available(), reason="needs MLX's CUDA backend")


class ClaimsInPlace(GatherAttention):
    """The gather path (MLX's scatter: correct anywhere) declaring in-place writes, so the
    CPU can check how the runner launches such steps."""

    writes_in_place = True


def test_only_all_decode_steps_on_an_in_place_backend_write_in_place():
    pool = PoolLayout(2, 8, 4)
    decode = DecodeEntries(np.array([3, 5], dtype=np.int32), [[0], [1, 2]])
    prefill = PrefillEntries([0], [4], [[3]])
    slots = np.arange(2)
    for backend, want in ((ClaimsInPlace(fused=False), True), (GatherAttention(False), False)):
        assert build_metadata(backend, pool, slots, decode, None).in_place is want
        assert not build_metadata(backend, pool, np.arange(6), decode, prefill).in_place
        assert not build_metadata(backend, pool, np.arange(4), None, prefill).in_place
        # A model whose every layer slides: its prefill plans are the windowed ones.
        slid = build_metadata(backend, pool, np.arange(6), decode, prefill, windows=(3,))
        assert slid.prefill is None and not slid.in_place
        slid = build_metadata(backend, pool, slots, decode, None, windows=(3,))
        assert slid.in_place is want
    assert not cuda_attention.CudaPagedAttention().writes_in_place
    assert cuda_attention.CudaPagedAttention(in_place=True).writes_in_place


@pytest.mark.parametrize("compiled", [False, True])
def test_a_step_starts_without_waiting_only_when_it_writes_in_place(
    gpt2_tiny: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
):
    """Prefill steps scatter (they wait); decode steps of an in-place backend do not; and
    the tokens are those of the plain backend."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    plain = LLM(str(gpt2_tiny), dtype="float32", compile_decode=compiled, **SMALL_KV)
    want = [o["token_ids"] for o in plain.generate(prompts, params)]

    monkeypatch.setattr(model_runner, "select_backend", lambda **_: ClaimsInPlace(fused=False))
    llm = LLM(
        str(gpt2_tiny),
        dtype="float32",
        compile_decode=compiled,
        async_scheduling=True,
        **SMALL_KV,
    )
    seen: list[tuple[bool, bool]] = []
    real_start = model_runner.start

    def start(launched: Any, pools: list[mx.array], wait: bool = True) -> None:
        seen.append((launched.step.meta.in_place, wait))
        real_start(launched, pools, wait)

    monkeypatch.setattr(model_runner, "start", start)
    got = [o["token_ids"] for o in llm.generate(prompts, params)]
    assert got == want
    assert (True, False) in seen and (False, True) in seen
    assert all(wait is not in_place for in_place, wait in seen)
    assert llm.engine.model_runner.steps_ahead_used > 0


def test_recurrent_states_always_wait(qwen35_tiny: Path, monkeypatch: pytest.MonkeyPatch):
    """A hybrid's decode step scatters its recurrent states, in place or not for K/V.
    On the CPU everywhere, the waits being the host's decision: on an H100, with this
    backend (the gather path's matmuls), qwen35-tiny's first prefill (the step-budget
    probe, which waits and scatters) failed inside MLX 0.32's CUDA graph
    (cudaGraphAddKernelNode: invalid argument) before any step could write in place."""
    monkeypatch.setattr(model_runner, "select_backend", lambda **_: ClaimsInPlace(fused=False))
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        llm = LLM(str(qwen35_tiny), dtype="float32", **SMALL_KV)
        waits: list[bool] = []
        real_start = model_runner.start

        def start(launched: Any, pools: list[mx.array], wait: bool = True) -> None:
            waits.append(wait)
            real_start(launched, pools, wait)

        monkeypatch.setattr(model_runner, "start", start)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        llm.generate([[5, 6, 7]], params)
    finally:
        mx.set_default_device(device)
    assert waits and all(waits)


def _twin_pools(
    rng: np.random.Generator, n_kv: int, slots: int, d: int, dtype: mx.Dtype, bs: int = 16
) -> tuple[KVCache, KVCache]:
    """Two caches with equal contents in separate buffers."""
    k, v = (rng.standard_normal((n_kv, slots, d)).astype(np.float32) for _ in range(2))
    a, b = (KVCache(mx.array(k).astype(dtype), mx.array(v).astype(dtype), bs) for _ in range(2))
    mx.eval(a.arrays(), b.arrays())
    return a, b


@CUDA
@pytest.mark.parametrize(
    "pool_dtype,new_dtype",
    [(mx.float16, mx.float16), (mx.bfloat16, mx.bfloat16), (mx.float16, mx.float32)],
)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_kernel_writes_what_the_scatter_writes(pool_dtype, new_dtype, head_dim: int):
    rng = np.random.default_rng(0)
    n_kv, slots, t = 4, 16 * 64, 37
    layout = PoolLayout(n_kv, 64, 16)
    rows = layout.write_rows(rng.permutation(slots)[:t].astype(np.int64))
    # Strided new rows, as a fused projection's slice gives them.
    fused = mx.array(rng.standard_normal((t, n_kv, 3 * head_dim)).astype(np.float32))
    k, v = fused[..., :head_dim].astype(new_dtype), fused[..., head_dim : 2 * head_dim]
    v = v.astype(new_dtype)
    mine, theirs = _twin_pools(rng, n_kv, slots, head_dim, pool_dtype)
    k_before = mine.k
    write_in_place(mine, k, v, rows)
    assert mine.written is not None and mine.k is k_before  # the same array, written
    mx.eval(mine.written)
    theirs.write(k, v, rows)
    mx.eval(theirs.arrays())
    for a, b in ((mine.k, theirs.k), (mine.v, theirs.v)):
        assert mx.array_equal(a, b).item()


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
@pytest.mark.parametrize(
    "pool_dtype,new_dtype", [(mx.float16, mx.float16), (mx.float32, mx.float16)]
)
def test_the_kernel_on_the_host_writes_what_the_scatter_writes(
    monkeypatch: pytest.MonkeyPatch, pool_dtype, new_dtype
):
    """The same kernel run on the host (tests/cuda_host.py): its grid, row indexing,
    strided new rows and K/V pools, on any machine."""
    with on_the_host(monkeypatch, cuda_write._kernel):
        rng = np.random.default_rng(1)
        n_kv, d, t = 3, 80, 9
        rows = PoolLayout(n_kv, 8, 16).write_rows(rng.permutation(128)[:t].astype(np.int64))
        fused = mx.array(rng.standard_normal((t, n_kv, 3 * d)).astype(np.float32))
        k, v = (fused[..., i * d : (i + 1) * d].astype(new_dtype) for i in (0, 1))
        mine, theirs = _twin_pools(rng, n_kv, 128, d, pool_dtype)
        write_in_place(mine, k, v, rows)
        mx.eval(mine.written)
        theirs.write(k, v, rows)
        got_k, got_v = cuda_write._kernel().inputs_after[3:5]
        np.testing.assert_array_equal(got_k, np.array(theirs.k))
        np.testing.assert_array_equal(got_v, np.array(theirs.v))


@CUDA
def test_the_decode_kernel_reads_the_rows_written_in_place_before_it():
    """Step by step, each step's new key written in place and read in the same graph by
    the kernel: any read that ran before its write would miss the newest key."""
    rng = np.random.default_rng(1)
    n_heads, n_kv, d, bs, blocks = 8, 2, 128, 16, 64
    layout = PoolLayout(n_kv, blocks, bs)
    mine, theirs = _twin_pools(rng, n_kv, blocks * bs, d, mx.float16, bs)
    table = rng.permutation(blocks)[:8].astype(np.int32)
    for pos in range(100):
        slot = np.array([table[pos // bs] * bs + pos % bs], dtype=np.int64)
        rows = layout.write_rows(slot)
        k = mx.array(10 * rng.standard_normal((1, n_kv, d))).astype(mx.float16)
        v = mx.array(rng.standard_normal((1, n_kv, d))).astype(mx.float16)
        q = mx.array(rng.standard_normal((1, n_heads, d))).astype(mx.float16)
        backend = cuda_attention.CudaPagedAttention(in_place=True)
        meta = AttentionMetadata(backend, rows, 1)
        assert meta.in_place
        backend.write(mine, k, v, meta)
        assert mine.written is not None  # written by the kernel, not the scatter
        tables, ctx = mx.array(table[None]), mx.array([pos + 1], dtype=mx.int32)
        args = (tables, ctx, bs, d**-0.5, len(table) * bs)
        got = cuda_decode.paged_decode(q, mine.k, mine.v, *args, after=mine.written)
        theirs.write(k, v, rows)
        want = cuda_decode.paged_decode(q, theirs.k, theirs.v, *args)
        mx.eval(got, want, theirs.arrays())
        np.testing.assert_allclose(
            np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=1e-3
        )


@CUDA
@pytest.mark.parametrize("fixture", ["gpt2_tiny", "gemma3_tiny"])
@pytest.mark.parametrize("compiled", [False, True])
def test_an_engine_decodes_the_same_tokens_with_in_place_writes(
    fixture: str, compiled: bool, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
):
    """Look-ahead, forks sharing blocks (copy-on-write), prefix hits, and (Gemma 3) sliding
    windows, with the pools written in place and through MLX's scatter."""
    path: Path = request.getfixturevalue(fixture)
    rng = np.random.default_rng(2)
    shared = rng.integers(0, 30000, 40).tolist()
    prompts = [shared + rng.integers(0, 30000, int(n)).tolist() for n in (1, 7, 30, 3)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=50, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=9, max_tokens=70, ignore_eos=True),
    ]
    runs = {}
    for in_place in ("1", "0"):
        monkeypatch.setenv("NANOVLLM_IN_PLACE_WRITES", in_place)
        llm = LLM(
            str(path),
            dtype="float32",
            compile_decode=compiled,
            async_scheduling=True,
            enable_prefix_caching=True,
            **SMALL_KV,
        )
        assert llm.engine.model_runner.backend.writes_in_place is (in_place == "1")
        outs = llm.generate(prompts, params)
        runs[in_place] = [o["token_ids"] for o in outs]
        assert llm.engine.model_runner.steps_ahead_used > 0
        assert llm.stats()["kv_blocks_used"] == 0
    assert runs["1"] == runs["0"]


@CUDA
def test_look_ahead_with_in_place_writes_neither_waits_nor_copies_the_pools(
    gpt2_tiny: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("NANOVLLM_IN_PLACE_WRITES", "1")
    llm = LLM(str(gpt2_tiny), dtype="float16", kv_cache_gb=0.5, async_scheduling=True)
    runner = llm.engine.model_runner
    assert runner.backend.writes_in_place
    pool_bytes = runner.caches[0].k.nbytes
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm.generate([[5, 6, 7]], params)  # traces and warms every shape first
    waits = []
    real = model_runner.start

    def start(launched: Any, pools: list[mx.array], wait: bool = True) -> None:
        waits.append(wait)
        real(launched, pools, wait)

    monkeypatch.setattr(model_runner, "start", start)
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    llm.generate([[8, 9, 10, 11]], params)
    assert runner.steps_ahead_used > 30
    assert waits.count(False) > 30  # every decode step but none of the prefill
    assert mx.get_peak_memory() - before < pool_bytes // 2


def test_in_place_writes_are_on_by_default_on_cuda(monkeypatch: pytest.MonkeyPatch):
    from nanovllm_mlx.attention import cuda_write, select_backend

    monkeypatch.setattr(cuda_attention, "available", lambda: True)
    monkeypatch.delenv("NANOVLLM_IN_PLACE_WRITES", raising=False)
    monkeypatch.delenv("NANOVLLM_KV_QUANT_KERNEL", raising=False)
    monkeypatch.delenv("NANOVLLM_QUANTIZED_IN_PLACE", raising=False)
    assert cuda_write.enabled() and select_backend().writes_in_place
    quantized = select_backend(quantized_kv=True)  # the kernel reads it and writes it
    assert isinstance(quantized, cuda_attention.CudaPagedAttention)
    assert quantized.writes_in_place
    assert not select_backend(sinks=True).writes_in_place  # the gather path's
    monkeypatch.setenv("NANOVLLM_IN_PLACE_WRITES", "0")
    assert not cuda_write.enabled() and not select_backend().writes_in_place
    monkeypatch.setenv("NANOVLLM_KV_QUANT_KERNEL", "0")
    assert not isinstance(select_backend(quantized_kv=True), cuda_attention.CudaPagedAttention)
