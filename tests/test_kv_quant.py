"""Quantized KV cache (attention/kv_quant.py, attention/kv_cache.py): the formats' round
trip and sizes, the pool's readers against a float pool holding the same values, peak
memory, and engines that quantize through prefix hits, forks, preemption, sliding windows,
compiled decode and mixed K/V dtypes. Tensor parallelism: tests/test_tensor_parallel.py."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_ids, run_cli, without_blas_notice

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention.attend import gathered_attention, sliced_attention
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import (
    INT4,
    INT8,
    KVFormat,
    dequantize,
    hadamard,
    quantize,
    resolve,
)
from nanovllm_mlx.attention.metadata import PoolLayout
from nanovllm_mlx.config import Config

FORMATS = [
    INT8,
    INT4,
    KVFormat("s4", bits=4),
    KVFormat("a8", bits=8, group=64, affine=True),
    KVFormat("s8", bits=8),
]


def _bound(x: np.ndarray, fmt: KVFormat) -> np.ndarray:
    """The largest error a row may have: half a quantization step of its group (the scale
    rounded up past bfloat16's error), plus the bias's outward rounding (affine)."""
    d = x.shape[-1]
    g = fmt.group_size(d)
    xg = x.reshape(*x.shape[:-1], d // g, g).astype(np.float64)
    if fmt.affine:
        lo, hi = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
        step = (hi - lo) / ((1 << fmt.bits) - 1)
        slack = np.abs(lo) * 2.0**-6
    else:
        step = np.abs(xg).max(-1, keepdims=True) / ((1 << (fmt.bits - 1)) - 1)
        slack = 0.0
    bound = step * 0.5 * (1 + 2.0**-6) + slack + 1e-30
    return np.broadcast_to(bound, xg.shape).reshape(x.shape)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("head_dim", [16, 64, 96, 128, 256])
def test_round_trip_is_within_half_a_step_of_each_group(fmt: KVFormat, head_dim: int):
    rng = np.random.default_rng(head_dim)
    # Rows of very different magnitudes side by side, lopsided rows, one large channel.
    x = rng.standard_normal((7, 3, head_dim)).astype(np.float32)
    x *= np.array([1e-6, 1e-2, 1, 30, 1e4, 3e7, 1])[:, None, None].astype(np.float32)
    x[6, 0] += 5.0
    x[6, 1, 3] = 200.0
    codes, scales = quantize(mx.array(x), fmt)
    assert codes.shape == (7, 3, fmt.code_width(head_dim))
    assert scales.shape == (7, 3, fmt.scale_width(head_dim))
    # A rotating format's bound holds for the turned rows (what is quantized); turning
    # back is orthonormal, so each row's error keeps its length.
    turned = x @ np.array(hadamard(head_dim)) if fmt.rotate else x
    bound = _bound(turned, fmt)
    inner = np.array(dequantize(codes, scales, fmt, mx.float32, rotated=True))
    assert np.all(np.abs(inner - turned) <= bound), np.abs(inner - turned).max()
    back = np.array(dequantize(codes, scales, fmt, mx.float32))
    err, room = np.linalg.norm(back - x, axis=-1), np.linalg.norm(bound, axis=-1)
    assert np.all(err <= room * 1.001 + 1e-30)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_zero_rows_read_back_as_zeros_and_huge_rows_stay_finite(fmt: KVFormat):
    x = np.zeros((4, 64), dtype=np.float32)
    # Near float32's largest (a rotation can grow an element by sqrt(64)): the scale must
    # not overflow, which float16 would (bfloat16 holds it).
    x[1] = 3e38 / (8 if fmt.rotate else 1)
    x[2, ::2], x[2, 1::2] = -1e30, 1e30
    x[3] = np.linspace(-1e-30, 1e-30, 64)  # tiny, but still resolved relative to itself
    codes, scales = quantize(mx.array(x), fmt)
    back = np.array(dequantize(codes, scales, fmt, mx.float32))
    assert np.all(np.isfinite(back))
    assert np.all(back[0] == 0)
    if not fmt.affine:  # an affine 1e30..-1e30 range overflows float32 itself
        assert np.allclose(back[1:3], x[1:3], rtol=2e-2)
    assert np.abs(back[3] - x[3]).max() <= 0.1e-30 * (16 if fmt.bits == 4 else 1)


def test_formats_meet_the_token_targets_against_float16():
    f16 = resolve("float16", mx.float32)
    for head_dim in (64, 96, 128, 256):
        ratio8 = f16.row_bytes(head_dim) / INT8.row_bytes(head_dim)
        ratio4 = f16.row_bytes(head_dim) / INT4.row_bytes(head_dim)
        assert ratio8 >= 1.9, (head_dim, ratio8)
        if head_dim % 64 == 0:
            assert ratio4 >= 3.5, (head_dim, ratio4)
    assert INT8.row_bytes(64) == 66 and INT4.row_bytes(64) == 36
    assert resolve("auto", mx.bfloat16).row_bytes(64) == 128


def _filled_cache(fmt: tuple[KVFormat, KVFormat], hkv: int, blocks: int, bs: int, d: int):
    cache = KVCache.allocate(fmt, hkv, blocks * bs, d, bs)
    layout = PoolLayout(hkv, blocks, bs)
    rng = np.random.default_rng(0)
    k = mx.array(rng.standard_normal((blocks * bs, hkv, d)).astype(np.float32) * 3)
    v = mx.array(rng.standard_normal((blocks * bs, hkv, d)).astype(np.float32))
    slots = np.arange(blocks * bs)
    cache.write(k, v, layout.write_rows(slots))
    return cache, layout


def _as_float(cache: KVCache) -> KVCache:
    """A float pool holding exactly what the quantized one reads back."""
    slots = cache.k.shape[1]
    return KVCache(
        cache.read_slots(0, 0, slots, mx.float32), cache.read_slots(1, 0, slots, mx.float32),
        cache.block_size,
    )  # fmt: skip


@pytest.mark.parametrize("kv", [(INT8, INT8), (INT4, INT4), (INT8, INT4)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
def test_every_reader_sees_what_a_float_pool_of_the_dequantized_values_gives(kv, fused, with_sinks):
    """Attention sinks (gpt-oss) included: the queries a reader turns see the same
    logits, and the sink logits are added to them unturned."""
    hkv, blocks, bs, d = 2, 12, 4, 32
    cache, layout = _filled_cache(kv, hkv, blocks, bs, d)
    ref = _as_float(cache)
    q = mx.array(np.random.default_rng(1).standard_normal((3, 5, 4, d)).astype(np.float32))
    sinks = mx.array([0.5, -1.0, 2.0, 0.0]) if with_sinks else None
    tables = np.array([[5, 2, 9], [0, 1, 2], [11, 3, 7]])
    rows = layout.block_rows(tables)
    mask = mx.array(np.tril(np.ones((5, 3 * bs), dtype=bool), k=3 * bs - 5)[None].repeat(3, 0))
    got = gathered_attention(q, cache, rows, mask, 0.3, fused=fused, sinks=sinks)
    want = gathered_attention(q, ref, rows, mask, 0.3, fused=fused, sinks=sinks)
    assert np.allclose(np.array(got), np.array(want), atol=1e-5)
    # The in-place slice read of a lone sequence (slots 8..30 of every head).
    got = sliced_attention(q[:1, :1], cache, 8, 22, 0.3, sinks)
    want = sliced_attention(q[:1, :1], ref, 8, 22, 0.3, sinks)
    assert np.allclose(np.array(got), np.array(want), atol=1e-5)
    # Quantization error is bounded, not zero: the values differ from what was written.
    assert not np.array_equal(np.array(ref.k), np.zeros_like(np.array(ref.k)))


def test_appending_to_a_block_never_changes_what_is_already_in_it():
    cache = KVCache.allocate((INT4, INT8), 2, 32, 64, 16)
    layout = PoolLayout(2, 2, 16)
    rng = np.random.default_rng(2)
    first = mx.array(rng.standard_normal((3, 2, 64)).astype(np.float32))
    cache.write(first, first, layout.write_rows(np.arange(3)))
    before = [np.array(cache.read_slots(i, 0, 3, mx.float32)) for i in (0, 1)]
    big = mx.array(rng.standard_normal((5, 2, 64)).astype(np.float32) * 1000)
    cache.write(big, big, layout.write_rows(np.arange(3, 8)))
    after = [np.array(cache.read_slots(i, 0, 3, mx.float32)) for i in (0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_copying_blocks_copies_codes_and_scales():
    cache, layout = _filled_cache((INT4, INT8), 2, 6, 4, 64)
    want = [np.array(cache.read_slots(i, 4, 8, mx.float32)) for i in (0, 1)]
    src, dst = layout.block_rows(np.array([[1]])), layout.block_rows(np.array([[4]]))
    cache.copy_blocks(src, dst, 2 * 6)
    got = [np.array(cache.read_slots(i, 16, 20, mx.float32)) for i in (0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got))


def test_a_gather_dequantizes_what_it_reads_not_the_pool():
    hkv, d, bs = 4, 64, 16
    blocks = 16384  # 64 MiB of int8 codes a pool; a float32 copy of one would be 256 MiB
    cache = KVCache.allocate((INT8, INT8), hkv, blocks * bs, d, bs)
    layout = PoolLayout(hkv, blocks, bs)
    mx.eval(cache.arrays())
    q = mx.ones((1, 1, 8, d))
    rows = layout.block_rows(np.array([[3, 70, 9000]]))
    mx.eval(q, rows)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = gathered_attention(q, cache, rows, None, 0.1)
    got = sliced_attention(q, cache, 100 * bs, 40, 0.1)
    mx.eval(out, got)
    assert mx.get_peak_memory() - base < 4 << 20  # a few blocks' worth, nowhere near 256 MiB


def test_invalid_kv_cache_dtypes_are_one_clear_error():
    for field in ("kv_cache_dtype", "kv_cache_dtype_k", "kv_cache_dtype_v"):
        for bad in ("int3", "fp8", "", "INT8", None, 8):
            if bad is None and field != "kv_cache_dtype":
                continue
            with pytest.raises(ValueError, match=f"{field} must be one of auto, float16"):
                Config(**{field: bad})
    config = Config(kv_cache_dtype="int8", kv_cache_dtype_v="float16")
    assert (config.kv_cache_dtype_k, config.kv_cache_dtype_v) == ("int8", "float16")


def test_a_bad_flag_value_is_one_error_line():
    proc = run_cli("ask", "--kv-cache-dtype", "int3", "hi")
    err = without_blas_notice(proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("error:") and "--kv-cache-dtype" in err[0] and "int3" in err[0]


# Engines ---------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _tokens(llm: LLM, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, params)]


def _prompt_logprobs(llm: LLM, prompt: list[int]) -> np.ndarray:
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))
    return np.array([next(iter(d.values())) for d in out[0]["prompt_logprobs"][1:]])


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_prefix_hits_forks_and_preemption_match_a_fresh_quantized_run(llama_tiny: Path, kv):
    shared = random_ids(40, seed=3)
    prompts = [shared + random_ids(n, seed=10 + n) for n in (5, 9, 21, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    fresh = [_tokens(LLM(str(llama_tiny), kv_cache_dtype=kv, kv_cache_gb=0.01), [p], params)[0]
             for p in prompts]  # fmt: skip
    # One engine, a pool of 12 blocks of 16: four 69-94-token sequences preempt each other,
    # and the shared 40-token prefix is served from the cache after the first.
    llm = LLM(str(llama_tiny), kv_cache_dtype=kv, max_model_len=96, max_num_batched_tokens=32)
    per_block = llm.engine.kv_cache_bytes / llm.stats()["kv_blocks_total"]
    small = LLM(
        str(llama_tiny), kv_cache_dtype=kv, kv_cache_gb=12 * per_block / 2**30,
        max_model_len=96, max_num_batched_tokens=32,
    )  # fmt: skip
    assert small.stats()["kv_blocks_total"] == 12
    assert _tokens(small, prompts, params) == fresh
    stats = small.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hit_tokens"] > 0
    assert stats["kv_blocks_used"] == 0
    # Forked choices share the prompt's blocks and copy the partial last one on write.
    forked = small.generate(
        [prompts[0]], SamplingParams(n=3, temperature=0.0, max_tokens=8, ignore_eos=True)
    )
    assert all(c["token_ids"] == fresh[0][:8] for c in forked[0]["outputs"])
    assert small.stats()["kv_blocks_copied"] > 0


_ERRORS: dict[tuple[str, str], float] = {}
_REF: list[np.ndarray] = []  # the float32 cache's logprobs (llama_tiny is the one model)


def _error(model: Path, k: str, v: str) -> float:
    """Mean absolute prompt-logprob difference from the compute-dtype cache (float32 here)
    over one 120-token prompt. The random-weight fixture is far more sensitive than a
    trained model (its bfloat16 pool alone differs by ~0.03), so tests compare orders."""
    if (k, v) not in _ERRORS:
        prompt = random_ids(120, seed=5)
        if not _REF:
            _REF.append(_prompt_logprobs(LLM(str(model), kv_cache_gb=0.01), prompt))
        llm = LLM(str(model), kv_cache_dtype_k=k, kv_cache_dtype_v=v, kv_cache_gb=0.01)
        _ERRORS[(k, v)] = float(np.abs(_prompt_logprobs(llm, prompt) - _REF[0]).mean())
    return _ERRORS[(k, v)]


@pytest.mark.parametrize("k, v", [("int8", "int4"), ("float16", "int8"), ("int4", "bfloat16")])
def test_mixed_k_and_v_dtypes_store_what_each_says(llama_tiny: Path, k: str, v: str):
    llm = LLM(str(llama_tiny), kv_cache_dtype_k=k, kv_cache_dtype_v=v, kv_cache_gb=0.01)
    cache = llm.engine.model_runner.caches[0]
    dtypes = {"int8": mx.int8, "int4": mx.uint8, "float16": mx.float16, "bfloat16": mx.bfloat16}
    assert (cache.k.dtype, cache.v.dtype) == (dtypes[k], dtypes[v])
    assert (cache.k_scales is not None, cache.v_scales is not None) == (
        k.startswith("int"), v.startswith("int")
    )  # fmt: skip
    assert llm.stats()["kv_cache_dtype"] == f"k={k},v={v}"
    # Each pool's error is its own: better than both pools in the coarser dtype.
    worse = max((k, v), key=lambda d: ("float16", "bfloat16", "int8", "int4").index(d))
    assert 0 < _error(llama_tiny, k, v) < _error(llama_tiny, worse, worse)


def test_quantized_logprobs_order_as_their_bits(llama_tiny: Path):
    err = {d: _error(llama_tiny, d, d) for d in ("float16", "bfloat16", "int8", "int4")}
    assert 0 < err["float16"] < err["bfloat16"] < err["int8"] < err["int4"], err
    assert err["int8"] < 0.2, err  # 0.074 measured; int4 1.0 on this random-weight model


def test_tokens_that_fit_count_the_real_bytes(llama_tiny: Path):
    fits = {
        kv: LLM(str(llama_tiny), kv_cache_dtype=kv, kv_cache_gb=0.01).stats()["kv_cache_tokens"]
        for kv in ("auto", "float16", "int8", "int4")
    }
    # head_dim 16 (fixture): int8 16+2 bytes a row against float16's 32; int4 8+4.
    assert fits["float16"] == pytest.approx(fits["auto"] * 2, abs=16)
    assert fits["int8"] == pytest.approx(fits["float16"] * 32 / 18, rel=0.01)
    assert fits["int4"] == pytest.approx(fits["float16"] * 32 / 12, rel=0.01)


def test_the_memory_guard_counts_quantized_bytes(llama_tiny: Path, monkeypatch):
    from nanovllm_mlx import backend

    monkeypatch.setattr(backend, "available_memory_bytes", lambda: 10 << 20)
    with pytest.raises(ValueError, match="the KV cache needs 0.02 GiB"):
        LLM(str(llama_tiny), kv_cache_dtype="int8", kv_cache_gb=0.02)
    LLM(str(llama_tiny), kv_cache_dtype="int8", kv_cache_gb=0.008)  # fits in 9 MiB usable


def test_sliding_window_model_frees_and_reads_quantized_blocks(gemma3_tiny: Path):
    # Past the fixture's 32-token window the block manager frees blocks every sliding
    # layer has left; answers must not depend on batching or on those freed blocks.
    prompts = [random_ids(n, seed=n) for n in (20, 45, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = LLM(str(gemma3_tiny), kv_cache_dtype="int8", kv_cache_gb=0.01)
    alone = [_tokens(llm, [p], params)[0] for p in prompts]
    assert _tokens(llm, prompts, params) == alone
    ref = _prompt_logprobs(LLM(str(gemma3_tiny), kv_cache_gb=0.01), prompts[2])
    err = np.abs(_prompt_logprobs(llm, prompts[2]) - ref).mean()
    bf16 = _prompt_logprobs(LLM(str(gemma3_tiny), kv_cache_dtype="bfloat16", kv_cache_gb=0.01),
                            prompts[2])  # fmt: skip
    assert 0 < err < 4 * np.abs(bf16 - ref).mean() + 0.05, err


def test_compiled_decode_reads_quantized_pools_as_eager_does(llama_tiny: Path):
    prompts = [random_ids(n, seed=n) for n in (7, 19, 33)]
    eager = LLM(str(llama_tiny), kv_cache_dtype="int4", kv_cache_gb=0.01, compile_decode=False)
    compiled = LLM(str(llama_tiny), kv_cache_dtype="int4", kv_cache_gb=0.01, compile_decode=True)
    assert _tokens(compiled, prompts) == _tokens(eager, prompts)
    assert compiled.stats()["compiled_buckets"] > 0


def test_the_server_reports_the_tokens_that_fit(gpt2_tiny: Path):
    from helpers import metrics, serving

    from nanovllm_mlx.serving.app import create_app

    app = create_app(str(gpt2_tiny), kv_cache_gb=0.01, kv_cache_dtype="int4")
    with serving(app) as url:
        got = metrics(url)
    # gpt2-tiny: 2 layers x 4 heads of 16: int4 8 code bytes + 2 x 2 scale bytes a row.
    want = int(0.01 * 2**30) // (2 * 2 * 16 * 4 * 12) * 16
    assert got["nanovllm_kv_cache_tokens"] == want
