"""Quantized pools written in place (cuda_quantize.write_quantizing): on CUDA, the
kernel's codes and scales are kv_quant.quantize's, landed where MLX's scatter puts them
(a code may differ by one where the Hadamard sums round differently), and an engine
decodes the same tokens with it as without; everywhere, which backend writes in place for
which cache."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import A8, S4, S8

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention import cuda_write, kv_quant, select_backend
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
    assert cuda_write.quantized_enabled()  # the default
    assert select_backend(quantized_kv=True).writes_in_place
    monkeypatch.setenv("NANOVLLM_QUANTIZED_IN_PLACE", "0")
    assert not select_backend(quantized_kv=True).writes_in_place
    monkeypatch.setenv("NANOVLLM_QUANTIZED_IN_PLACE", "1")
    monkeypatch.setenv("NANOVLLM_IN_PLACE_WRITES", "0")  # the switch of every in-place write
    assert not select_backend(quantized_kv=True).writes_in_place


def test_a_latent_cache_is_not_written_in_place():
    cache = KVCache(mx.zeros((1, 32, 8)), None, 16)
    with pytest.raises(ValueError, match="latent"):
        write_in_place(cache, mx.zeros((1, 1, 8)), mx.zeros((1, 1, 8)), mx.zeros((1,)))


# (K, V, head_dim): Llama 3's head_dim with every pair, then other widths (80: lanes past
# the row and a 16-wide Hadamard block; 96: int4's group of 64 does not divide it; 16:
# half a warp) and the other layouts kv_quant describes.
CASES = [(k, v, 128) for k, v in PAIRS] + [
    (S8, A8, 80),
    (INT4, S4, 96),
    (INT8, INT4, 64),
    (INT4, INT8, 256),
    (A8, INT4, 16),
    (S4, S8, 128),
]


def _rows_as_floats(cache: KVCache, which: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool `which` (0: K, 1: V) as float32 rows [Hkv * slots, D], left turned, and each
    row's largest step (scale) between neighbouring codes; 0 for a float pool."""
    fmt = cache.formats[which]  # type: ignore[index]
    pool = (cache.k, cache.v)[which]
    scales = (cache.k_scales, cache.v_scales)[which]
    if not fmt.quantized:
        flat = pool.astype(mx.float32)
        return np.array(flat).reshape(-1, pool.shape[-1]), np.zeros(1)
    rows = kv_quant.dequantize(pool, scales, fmt, mx.float32, rotated=True)
    n = scales.shape[-1] // (2 if fmt.affine else 1)
    step = np.array(scales[..., :n].astype(mx.float32)).max(axis=-1)
    return np.array(rows).reshape(-1, rows.shape[-1]), step.reshape(-1, 1)


@CUDA
@pytest.mark.parametrize("k_fmt,v_fmt,d", CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_codes_and_scales_are_the_scatters(k_fmt: KVFormat, v_fmt: KVFormat, d: int):
    """Against kv_quant.quantize run on the CPU."""
    rng = np.random.default_rng(0)
    n_kv, blocks, bs, t = 4, 64, 16, 37
    formats = (k_fmt, v_fmt)
    rows = PoolLayout(n_kv, blocks, bs).write_rows(rng.permutation(blocks * bs)[:t])
    # A few large channels, as keys carry (what the Hadamard turn is for).
    spread = np.where(rng.random(3 * d) < 0.05, 20.0, 1.0).astype(np.float32)
    fused = mx.array(rng.standard_normal((t, n_kv, 3 * d)).astype(np.float32) * spread)
    k, v = (fused[..., i * d : (i + 1) * d].astype(mx.float16) for i in (0, 1))  # strided
    mine, theirs = (KVCache.allocate(formats, n_kv, blocks * bs, d, bs) for _ in range(2))
    before = mine.arrays()
    write_in_place(mine, k, v, rows)
    assert mine.written is not None
    assert all(a is b for a, b in zip(mine.arrays(), before))  # the same arrays, written
    mx.eval(mine.written)
    with mx.stream(mx.cpu):  # float32 throughout (CUDA's float32 products are TF32)
        theirs.write(k, v, rows)
        mx.eval(theirs.arrays())
    for which in (0, 1):
        got, _ = _rows_as_floats(mine, which)
        want, step = _rows_as_floats(theirs, which)
        if step.any():  # within a code's step of kv_quant.quantize's rows
            bound = np.broadcast_to(1.01 * step + 1e-6, got.shape)
            np.testing.assert_array_less(np.abs(got - want), bound)
        else:  # a float pool: the rows as they are
            np.testing.assert_array_equal(got, want)
    # Most stored elements equal (a scale may round apart by bfloat16's last bit, a code
    # by one), and rows not written stay as they were.
    written = np.zeros(n_kv * blocks * bs, dtype=bool)
    written[np.array(rows)] = True
    for a, b in zip(mine.arrays(), theirs.arrays()):
        same = np.array(mx.equal(a, b).reshape(written.size, -1))
        assert same[~written].all()
        assert same[written].mean() > 0.99, f"{same[written].mean():.4f} equal the scatter's"


@CUDA
@pytest.mark.parametrize("formats", [(INT8, INT8), (INT4, INT8)], ids=["int8", "int4-int8"])
def test_an_engine_decodes_the_same_tokens_with_quantized_pools_written_in_place(
    gpt2_tiny: Path, monkeypatch: pytest.MonkeyPatch, formats: tuple[KVFormat, KVFormat]
):
    """Look-ahead (a step launched while the one before it runs), forks (copy-on-write of
    codes and scales) and prefix hits, against the same engine waiting for every step.
    Both write through the kernel: MLX's scatter path quantizes through a TF32 Hadamard
    product on CUDA (MLX_ENABLE_TF32's default), so its codes differ from the kernel's by
    rounding, which test_codes_and_scales_are_the_scatters bounds."""
    monkeypatch.setenv("NANOVLLM_QUANTIZED_IN_PLACE", "1")
    rng = np.random.default_rng(3)
    shared = rng.integers(0, 30000, 40).tolist()
    prompts = [shared + rng.integers(0, 30000, int(n)).tolist() for n in (1, 9, 30)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True),
    ]
    runs = {}
    for ahead in (True, False):
        llm = LLM(
            str(gpt2_tiny),
            kv_cache_dtype_k=formats[0].name,
            kv_cache_dtype_v=formats[1].name,
            kv_cache_gb=0.05,
            async_scheduling=ahead,
        )
        assert llm.engine.model_runner.backend.writes_in_place
        runs[ahead] = [o["token_ids"] for o in llm.generate(prompts, params)]
        assert (llm.engine.model_runner.steps_ahead_used > 0) is ahead
    assert runs[True] == runs[False]
