"""Prompt chunks padded to a few attention shapes (attention/chunk_shapes.py, opt-in on CUDA):
the sizes, the padding's invariants, and reads that equal the unpadded ones, with
nonzero keys past every chunk's own, on float and quantized pools."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nanovllm_mlx.attention.chunk_shapes import bucket, padding
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import INT4, INT8
from nanovllm_mlx.attention.metadata import PoolLayout, PrefillEntries


def test_sizes_are_few_monotone_and_their_own_bucket():
    sizes = [bucket(n) for n in range(1, 40_000)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all(bucket(s) == s >= n for n, s in enumerate(sizes, 1))
    # Padding: under 16 rows up to 64, under a quarter up to 1,024, under 256 above.
    assert all(s - n < max(16, min(n // 4 + 1, 256)) for n, s in enumerate(sizes, 1))
    assert len({bucket(n) for n in range(256, 2049)}) == 13
    assert len({bucket(n) for n in range(2, 32_769)}) == 4 + 16 + 124


@pytest.mark.parametrize("start", [0, 1, 5, 15, 16, 17, 100, 255, 256, 1000, 2265, 16_000])
def test_padding_keeps_each_real_query_on_its_own_keys(start: int):
    for n in list(range(2, 300)) + [1023, 1024, 1025, 2265, 4096, 8191]:
        front, back = padding(start, n)
        lq, lk = front + n + back, start + n + back
        assert front >= 0 and back >= 0
        assert bucket(lq) == lq and bucket(lk) == lk  # both shapes are sizes
        # SDPA's causal mode aligns the last query with the last key: query j sees keys
        # [0, lk - lq + j]. Real query i (row front + i) must see [0, start + i], and
        # the first padded query at least one key.
        assert lk - lq + front == start
        assert lk - lq >= 0


def _pool(kv: str, hkv: int, blocks: int, bs: int, d: int) -> KVCache:
    """Every slot written with nonzero values, so a padded key that leaked into a real
    query's read would change it."""
    if kv == "float":
        rng = np.random.default_rng(3)
        k, v = (
            mx.array(rng.standard_normal((hkv, blocks * bs, d)).astype(np.float32)) for _ in "kv"
        )
        return KVCache(k, v, bs)
    fmt = {"int8": INT8, "int4": INT4}[kv]
    cache = KVCache.allocate((fmt, INT8), hkv, blocks * bs, d, bs)
    rng = np.random.default_rng(4)
    k = mx.array(rng.standard_normal((blocks * bs, hkv, d)).astype(np.float32) * 3)
    v = mx.array(rng.standard_normal((blocks * bs, hkv, d)).astype(np.float32))
    cache.write(k, v, PoolLayout(hkv, blocks, bs).write_rows(np.arange(blocks * bs)))
    return cache


@pytest.mark.parametrize("kv", ["float", "int8", "int4"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
# float16: the dtype MLX's CUDA build gives to cuDNN, the reads this padding is for.
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
def test_padded_chunks_read_what_unpadded_ones_read(kv: str, with_sinks: bool, dtype: mx.Dtype):
    hkv, h, d, bs, blocks = 2, 4, 32, 4, 40
    pool = PoolLayout(hkv, blocks, bs)
    cache = _pool(kv, hkv, blocks, bs, d)
    entries = PrefillEntries(
        starts=[0, 5, 3, 0, 17],
        lengths=[9, 25, 6, 2, 40],
        block_tables=[
            [0, 1, 2],  # consecutive: read in place, 16 keys of 9 real
            [20, 7, 21, 9, 10, 11, 12, 13],  # scattered: gathered, its table padded
            [37, 38, 39],  # consecutive up to the pool's end: its padded read is gathered
            [14],
            list(range(22, 37)),  # a later chunk, in place
        ],
    )
    plain = GatherAttention(fused=True).plan_prefill(entries, pool)
    padded = GatherAttention(fused=True, chunk_buckets=True).plan_prefill(entries, pool)
    assert isinstance(plain, list) and isinstance(padded, list)
    assert [(c.front, c.back, c.length) for c in padded] == [
        (0, 7, 16), (5, 2, 32), (3, 7, 16), (0, 14, 16), (1, 7, 64),
    ]  # fmt: skip
    assert [c.rows is None for c in plain] == [True, False, True, True, True]
    assert [c.rows is None for c in padded] == [True, False, False, True, True]
    rng = np.random.default_rng(5)
    q = mx.array(rng.standard_normal((sum(entries.lengths), h, d)).astype(np.float32))
    if dtype == mx.float16:
        q = q.astype(dtype)  # quantized pools dequantize into q's dtype
        if kv == "float":
            cache = KVCache(cache.k.astype(dtype), cache.v.astype(dtype), bs)
    sinks = mx.array([0.5, -1.0, 2.0, 8.0], dtype=dtype) if with_sinks else None
    backend = GatherAttention(fused=True)
    want = backend.prefill(q, cache, plain, d**-0.5, sinks)
    got = backend.prefill(q, cache, padded, d**-0.5, sinks)
    assert got.shape == want.shape == (sum(entries.lengths), h * d)
    # A GPU's float32 products run in TF32, whose rounding the padded shapes change: up to
    # 3.3e-3 apart on an H100 (benchmarks/logs/h100_tests_prefill_v18.log).
    tol = {mx.float16: 2e-3}.get(dtype, 1e-5 if mx.default_device() == mx.cpu else 5e-3)
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
