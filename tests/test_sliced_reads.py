"""A lone sequence's keys read in place (a view of the pool) by the gather backend: which
steps are (and so run eager), and MLX's CUDA build; and a prompt chunk's, causal.

MLX sends a one-query SDPA over a view of a cache whose slot count is a multiple of 256
to cuDNN's decode path, which reads every view from the cache's first slot (mlx-lm's
views all begin there). The gather backend therefore gathers such a sequence from such a
pool instead of handing SDPA a view that begins elsewhere (GatherAttention.cudnn_views).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import dense

from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention import select_backend
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.metadata import DecodeEntries, KVCache, PoolLayout, PrefillEntries
from nanovllm_mlx.attention.paged import build_metadata, paged_attention

H, HKV, D, BS = 8, 2, 128, 16


def token_major(pool: np.ndarray, slot: int, length: int) -> np.ndarray:
    """Pool slots [slot, slot + length) of every head as float32 [length, Hkv, D], as
    helpers.dense takes keys and values."""
    return pool[:, slot : slot + length].transpose(1, 0, 2).astype(np.float32)


def lone_entries(first_block: int, context: int) -> DecodeEntries:
    blocks = list(range(first_block, first_block + -(-context // BS)))
    return DecodeEntries(np.array([context]), [blocks])


@pytest.mark.parametrize(
    "num_blocks,cudnn_views,in_place",
    [(64, True, False), (65, True, True), (64, False, True), (80, True, False)],
)
def test_views_of_a_pool_cudnn_would_misread_are_gathered(
    num_blocks: int, cudnn_views: bool, in_place: bool
):
    backend = GatherAttention(fused=True, cudnn_views=cudnn_views)
    pool = PoolLayout(HKV, num_blocks, BS)
    (group,) = backend.plan_decode(lone_entries(16, 512), pool)
    assert (group.offset is not None) == in_place
    assert (group.rows is None) == in_place


def test_which_steps_are_read_in_place():
    backend, pool = GatherAttention(fused=True), PoolLayout(HKV, 65, BS)
    assert backend.reads_in_place(lone_entries(16, 512), pool)
    assert backend.reads_in_place(lone_entries(16, 1), pool)
    scattered = DecodeEntries(np.array([40]), [[3, 9, 4]])
    assert not backend.reads_in_place(scattered, pool)
    # Blocks past the context (reserved for a step ahead) do not count.
    assert backend.reads_in_place(DecodeEntries(np.array([32]), [[3, 4, 9]]), pool)
    two = DecodeEntries(np.array([20, 20]), [[1, 2], [3, 4]])
    assert not backend.reads_in_place(two, pool)
    assert not GatherAttention(fused=False).reads_in_place(lone_entries(16, 512), pool)
    cudnn_pool = PoolLayout(HKV, 64, BS)
    assert not GatherAttention(True, cudnn_views=True).reads_in_place(
        lone_entries(16, 512), cudnn_pool
    )
    kernel = cuda_attention.CudaPagedAttention()
    assert not kernel.reads_in_place(lone_entries(16, 512), pool)


def test_the_cpu_path_never_slices():
    backend = GatherAttention(fused=False, cudnn_views=True)
    (group,) = backend.plan_decode(lone_entries(16, 512), PoolLayout(HKV, 65, BS))
    assert group.offset is None


@pytest.mark.parametrize("num_blocks", [64, 65])
def test_lone_sequence_reads_its_own_keys(num_blocks: int, monkeypatch):
    """float16 and head_dim 128, 512 keys at slot 256 of a 1,024-slot pool: what cuDNN's
    decode path takes on CUDA, where the backend is select_backend's with the kernel off
    (a Mac's path, run on the GPU machine); on the CPU, fused SDPA over the same views."""
    backend = GatherAttention(fused=True)
    if cuda_attention.on_gpu():
        monkeypatch.setenv("NANOVLLM_PAGED_KERNEL", "0")
        cuda_attention.available.cache_clear()
        try:
            backend = select_backend()
        finally:
            monkeypatch.delenv("NANOVLLM_PAGED_KERNEL")
            cuda_attention.available.cache_clear()
        assert isinstance(backend, GatherAttention) and backend.cudnn_views
    rng = np.random.default_rng(0)
    slots, context, first = num_blocks * BS, 512, 16
    k_pool = rng.standard_normal((HKV, slots, D)).astype(np.float16)
    v_pool = rng.standard_normal((HKV, slots, D)).astype(np.float16)
    q = rng.standard_normal((1, H, D)).astype(np.float16)
    cache = KVCache(mx.array(k_pool), mx.array(v_pool), BS)
    pool = PoolLayout(HKV, num_blocks, BS)
    meta = build_metadata(
        backend, pool, np.zeros(0, dtype=np.int64), lone_entries(first, context), None
    )
    out = paged_attention(mx.array(q), None, None, cache, meta, D**-0.5)
    keys, values = (token_major(p, first * BS, context) for p in (k_pool, v_pool))
    want = dense(q.astype(np.float32), keys, values, context - 1)
    np.testing.assert_allclose(np.array(out, dtype=np.float32), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_blocks", [64, 65])
def test_a_prompt_chunk_reads_its_consecutive_blocks_in_place(num_blocks: int):
    """float16, head_dim 128: a 48-token chunk after 464 cached keys at block 16, read
    causally from a view of the pool (on a GPU, cuDNN's prefill path; on the CPU, MLX's
    fused SDPA), against each query's softmax over the keys up to its own. In place from
    a pool of a multiple of 256 slots too: only one-query reads of such views go wrong."""
    backend = GatherAttention(fused=True, cudnn_views=True)
    rng = np.random.default_rng(1)
    slots, start, n, first = num_blocks * BS, 464, 48, 16
    k_pool = rng.standard_normal((HKV, slots, D)).astype(np.float16)
    v_pool = rng.standard_normal((HKV, slots, D)).astype(np.float16)
    q = rng.standard_normal((n, H, D)).astype(np.float16)
    cache = KVCache(mx.array(k_pool), mx.array(v_pool), BS)
    pool = PoolLayout(HKV, num_blocks, BS)
    table = list(range(first, first + -(-(start + n) // BS)))
    entries = PrefillEntries([start], [n], [table])
    meta = build_metadata(backend, pool, np.zeros(0, dtype=np.int64), None, entries)
    (chunk,) = meta.prefill
    assert chunk.rows is None and chunk.offset == first * BS  # read in place
    out = np.array(paged_attention(mx.array(q), None, None, cache, meta, D**-0.5), np.float32)
    keys, values = (token_major(p, first * BS, start + n) for p in (k_pool, v_pool))
    want = dense(q.astype(np.float32), keys, values, start)
    np.testing.assert_allclose(out, want, atol=2e-2, rtol=2e-2)
