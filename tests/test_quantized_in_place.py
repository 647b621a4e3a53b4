"""Quantized pools written in place (cuda_write.write_quantized_in_place): on CUDA, the
codes and scales land where MLX's scatter puts them, the decode kernel reads them after
the write, and an engine decodes the same tokens with it as without; everywhere, which
backend writes in place for which cache."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention import cuda_write, select_backend
from nanovllm_mlx.attention.cuda_write import write_in_place
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import INT4, INT8, KVFormat, resolve
from nanovllm_mlx.attention.metadata import PoolLayout

CUDA = pytest.mark.skipif(not cuda_attention.available(), reason="needs MLX's CUDA backend")
F16 = resolve("auto", mx.float16)
PAIRS = [(INT8, INT8), (INT4, INT4), (INT8, F16), (F16, INT4), (INT4, INT8)]


def test_which_caches_are_written_in_place(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cuda_attention, "available", lambda: True)
    monkeypatch.delenv("NANOVLLM_IN_PLACE_WRITES", raising=False)
    monkeypatch.delenv("NANOVLLM_KV_QUANT_KERNEL", raising=False)
    monkeypatch.delenv("NANOVLLM_QUANTIZED_IN_PLACE", raising=False)
    assert not cuda_write.quantized_enabled()
    assert not select_backend(quantized_kv=True).writes_in_place
    monkeypatch.setenv("NANOVLLM_QUANTIZED_IN_PLACE", "1")
    assert select_backend(quantized_kv=True).writes_in_place
    monkeypatch.setenv("NANOVLLM_IN_PLACE_WRITES", "0")  # the switch of every in-place write
    assert not select_backend(quantized_kv=True).writes_in_place


def test_a_latent_cache_is_not_written_in_place():
    cache = KVCache(mx.zeros((1, 32, 8)), None, 16)
    with pytest.raises(ValueError, match="latent"):
        write_in_place(cache, mx.zeros((1, 1, 8)), mx.zeros((1, 1, 8)), mx.zeros((1,)))


@CUDA
@pytest.mark.parametrize("formats", PAIRS, ids=lambda f: f"{f[0].name}-{f[1].name}")
def test_codes_and_scales_land_where_the_scatter_puts_them(formats: tuple[KVFormat, KVFormat]):
    rng = np.random.default_rng(0)
    n_kv, blocks, bs, d, t = 4, 64, 16, 128, 37
    rows = PoolLayout(n_kv, blocks, bs).write_rows(rng.permutation(blocks * bs)[:t])
    fused = mx.array(rng.standard_normal((t, n_kv, 3 * d)).astype(np.float32))
    k, v = (fused[..., i * d : (i + 1) * d].astype(mx.float16) for i in (0, 1))  # strided
    mine, theirs = (KVCache.allocate(formats, n_kv, blocks * bs, d, bs) for _ in range(2))
    before = mine.arrays()
    write_in_place(mine, k, v, rows)
    assert mine.written is not None
    assert all(a is b for a, b in zip(mine.arrays(), before))  # the same arrays, written
    mx.eval(mine.written)
    theirs.write(k, v, rows)
    mx.eval(theirs.arrays())
    for a, b in zip(mine.arrays(), theirs.arrays()):
        assert mx.array_equal(a, b).item()


@CUDA
@pytest.mark.parametrize("formats", [(INT8, INT8), (INT4, INT8)], ids=["int8", "int4-int8"])
def test_an_engine_decodes_the_same_tokens_with_quantized_pools_written_in_place(
    gpt2_tiny: Path, monkeypatch: pytest.MonkeyPatch, formats: tuple[KVFormat, KVFormat]
):
    """Look-ahead, forks (copy-on-write of codes and scales) and prefix hits."""
    rng = np.random.default_rng(3)
    shared = rng.integers(0, 30000, 40).tolist()
    prompts = [shared + rng.integers(0, 30000, int(n)).tolist() for n in (1, 9, 30)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True),
    ]
    runs = {}
    for on in ("1", "0"):
        monkeypatch.setenv("NANOVLLM_QUANTIZED_IN_PLACE", on)
        llm = LLM(
            str(gpt2_tiny),
            kv_cache_dtype_k=formats[0].name,
            kv_cache_dtype_v=formats[1].name,
            kv_cache_gb=0.05,
            async_scheduling=True,
        )
        assert llm.engine.model_runner.backend.writes_in_place is (on == "1")
        runs[on] = [o["token_ids"] for o in llm.generate(prompts, params)]
        assert llm.engine.model_runner.steps_ahead_used > 0
    assert runs["1"] == runs["0"]
