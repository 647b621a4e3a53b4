"""Paged attention against dense causal attention, for decode, prefill and chunks after a
cached prefix, all in one mixed batch with scattered block tables."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import dense, kernel_and_gather, random_tables

from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention import cuda_decode
from nanovllm_mlx.attention.decode_groups import length_groups
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.metadata import NULL_BLOCK, KVCache, PoolLayout
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.runner.step_inputs import prepare
from nanovllm_mlx.sampling_params import SamplingParams

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 1024
# float32 matmuls on a GPU run in TF32 (~1e-3 relative); the CPU computes in full float32.
TOL = 1e-5 if mx.default_device() == mx.cpu else 2e-3


@pytest.mark.parametrize(
    "cases",
    [
        [(0, 9)],  # one fresh prompt
        [(7, 8)],  # one decode
        [(0, 5), (3, 4), (16, 17), (4, 13), (0, 1), (9, 30)],  # mixed batch
        [(8, 12), (12, 20)],  # chunks after cached prefixes, at block boundaries
        [(5, 30)],  # one chunk after a cached prefix (SDPA's causal mode on GPUs)
        [(16, 40), (3, 4), (9, 10)],  # decodes and one chunk
        # 34 decodes of mixed lengths, read in length groups, and a prompt
        [(c - 1, c) for c in [1 + (i * 37) % 97 for i in range(34)]] + [(0, 6)],
        # 20 decodes with tied lengths (two groups) and a chunk after a cached prefix
        [(c - 1, c) for c in [5, 9, 9, 9, 30, 30, 2, 2, 17, 17] * 2] + [(4, 11)],
    ],
)
@pytest.mark.parametrize(
    "backend",
    [
        GatherAttention(fused=False),  # the CPU path
        GatherAttention(fused=True),  # the GPU path's SDPA, which MLX also runs on CPU
        # ... with prompt chunks padded to a few shapes (chunk_shapes, opt-in on CUDA)
        GatherAttention(fused=True, chunk_buckets=True),
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not cuda_attention.available(), reason="needs CUDA"),
        ),
    ],
    ids=["gather-matmul", "gather-sdpa", "gather-sdpa-buckets", "cuda-kernel"],
)
@pytest.mark.parametrize("window", [None, 5, 9])
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
def test_paged_matches_dense(
    cases: list[tuple[int, int]], backend, window: int | None, contiguous: bool, with_sinks: bool
):
    """window: a sliding-window layer's read; the blocks before each sequence's first
    visible key are NULL_BLOCK in its table, as after the block manager freed them.
    contiguous: each sequence's blocks are consecutive (the gather path's SDPA then reads
    a lone sequence's keys in place); scattered: a random permutation. with_sinks:
    gpt-oss's attention sinks, which the CUDA kernel leaves to the gather path."""
    if backend == "cuda":
        if with_sinks:
            pytest.skip("the CUDA kernel has no sinks: select_backend routes them around it")
        backend = cuda_attention.CudaPagedAttention()
    rng = np.random.default_rng(0)
    # Sinks around the scores' scale (std 1 here) and one far above it, where the sink
    # takes nearly all of a head's weight.
    sinks = np.array([0.5, -1.0, 2.0, 8.0], dtype=np.float32)[:H] if with_sinks else None
    free = list(range(NUM_BLOCKS))[::-1] if contiguous else list(rng.permutation(NUM_BLOCKS))
    cache = KVCache(mx.zeros((HKV, NUM_BLOCKS * BS, D)), mx.zeros((HKV, NUM_BLOCKS * BS, D)), BS)
    batch, data = [], []
    for i, (start, end) in enumerate(cases):
        seq = Sequence(i, list(range(end)), SamplingParams())
        seq.block_table = [int(free.pop()) for _ in range(-(-end // BS))]
        seq.num_computed_tokens = start
        q = rng.standard_normal((end, H, D)).astype(np.float32)
        k = rng.standard_normal((end, HKV, D)).astype(np.float32)
        v = rng.standard_normal((end, HKV, D)).astype(np.float32)
        # The prefix [0, start) is already in the cache from earlier steps.
        for p in range(start):
            slot = seq.block_table[p // BS] * BS + p % BS
            cache.k[:, slot] = mx.array(k[p])
            cache.v[:, slot] = mx.array(v[p])
        if window is not None:
            for b in range(max(0, start - window + 1) // BS):
                seq.block_table[b] = NULL_BLOCK
        batch.append(ScheduledSeq(seq, end - start))
        data.append((q, k, v, start, end))
    step = prepare(batch, PoolLayout(HKV, NUM_BLOCKS, BS), backend, windows=(window,))
    decode_plan = step.meta.plans(window)[0]
    if contiguous and isinstance(backend, GatherAttention) and backend.fused and decode_plan:
        if not isinstance(backend, cuda_attention.CudaPagedAttention):
            lone = [g for g in decode_plan if g.end - g.start == 1]
            assert all(g.offset is not None for g in lone)  # read in place, not gathered
    # Flat order: single-token entries first, shortest context first, then the others in
    # batch order.
    order = [i for i, it in enumerate(batch) if it.num_new_tokens == 1]
    order.sort(key=lambda i: batch[i].seq.num_computed_tokens)
    order += [i for i, it in enumerate(batch) if it.num_new_tokens > 1]
    q = np.concatenate([data[i][0][data[i][3] :] for i in order])
    k = np.concatenate([data[i][1][data[i][3] :] for i in order])
    v = np.concatenate([data[i][2][data[i][3] :] for i in order])
    out = paged_attention(
        mx.array(q),
        mx.array(k),
        mx.array(v),
        cache,
        step.meta,
        D**-0.5,
        window,
        None if sinks is None else mx.array(sinks),
    )
    mx.eval(out)
    got, offset = np.array(out), 0
    for i in order:
        qi, ki, vi, start, end = data[i]
        n = end - start
        np.testing.assert_allclose(
            got[offset : offset + n],
            dense(qi[start:], ki, vi, start, window, sinks),
            atol=TOL,
            rtol=TOL,
        )
        offset += n
    assert offset == got.shape[0]


@pytest.mark.parametrize(
    "context,groups",
    [
        ([5], [(0, 1)]),
        ([5] * 32, [(0, 32)]),  # all pad to the same blocks: one group
        (list(range(1, 17)), [(0, 16)]),  # two groups, both of one block: merged
        ([3] * 16 + [40] * 16, [(0, 16), (16, 32)]),
        ([3] * 8 + [4] * 8 + [40] * 8 + [41] * 8, [(0, 16), (16, 32)]),  # merged neighbours
        (list(range(1, 101)), [(0, 25), (25, 50), (50, 75), (75, 100)]),
    ],
)
def test_length_groups(context: list[int], groups: list[tuple[int, int]]):
    assert length_groups(np.array(context), 16) == groups


def test_fused_prefill_reads_each_chunk_on_its_own_without_a_mask():
    """Fused SDPA, full attention: every chunk of a step is its own causal read (no
    [Bp, Lq, L] mask, no padding to the longest chunk), of its gathered blocks or, where
    they are consecutive, of its pool slots in place; a sliding window and the matmul
    path keep one padded, masked read."""
    from nanovllm_mlx.attention.gather import CausalChunk, PrefillPlan
    from nanovllm_mlx.attention.metadata import PrefillEntries

    pool = PoolLayout(HKV, NUM_BLOCKS, BS)
    entries = PrefillEntries(
        starts=[0, 6, 3, 4],
        lengths=[5, 9, 2, 6],
        block_tables=[[7, 2], [4, 9, 1, 8], [3, 5], [10, 11, 12, 30]],
    )
    chunks = GatherAttention(fused=True).plan_prefill(entries, pool)
    assert isinstance(chunks, list) and all(isinstance(c, CausalChunk) for c in chunks)
    spans = [(c.begin, c.end, c.length, c.offset) for c in chunks]
    assert spans == [(0, 5, 5, None), (5, 14, 15, None), (14, 16, 5, None), (16, 22, 10, 40)]
    # The gathered read the blocks their keys fill (2, 4 and 2 of 4 slots, every head);
    # the last chunk's keys fill blocks 10-12, consecutive: slots 40-49 in place.
    assert [None if c.rows is None else c.rows.size for c in chunks] == [4, 8, 4, None]
    for backend, window in ((GatherAttention(fused=True), 4), (GatherAttention(fused=False), None)):
        assert isinstance(backend.plan_prefill(entries, pool, window), PrefillPlan)


@pytest.mark.parametrize("batch,context", [(1, 1), (1, 1000), (128, 1024), (3, 77), (64, 33)])
def test_decode_partitions_cover_every_token_once(batch: int, context: int):
    parts, size = cuda_decode.num_partitions(batch, 12, context)
    assert parts >= 1 and (parts - 1) * size < context <= parts * size


@pytest.mark.skipif(not cuda_attention.available(), reason="needs MLX's CUDA backend")
@pytest.mark.parametrize(
    "dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["float32", "float16", "bfloat16"]
)
@pytest.mark.parametrize(
    "n_heads,n_kv,head_dim",
    # Llama 3 (4 query heads a block), 16 to 1 (two blocks a KV head), Gemma 3's 256-wide
    # heads, a group of 3, and no grouping.
    [(12, 12, 64), (32, 8, 128), (16, 1, 128), (4, 1, 256), (9, 3, 64), (7, 7, 80)],
)
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize(
    "unroll,vector,keys",
    # keys None: the launcher's choice, two keys side by side a warp where vector loads
    # of head_dim 64 or 128 allow it (cuda_formats.keys_side_by_side), else one.
    [(1, False, 1), (2, False, 1), (3, False, 1), (2, True, 1), (2, True, None), (3, True, None)],
    ids=[
        "unroll1",
        "unroll2",
        "unroll3",
        "unroll2-vector-onekey",
        "unroll2-vector",
        "unroll3-vector",
    ],
)
def test_cuda_decode_kernel_matches_gather_path(
    dtype,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    window: int | None,
    unroll: int,
    vector: bool,
    keys: int | None,
):
    rng = np.random.default_rng(1)
    bs, num_blocks = 16, 512
    contexts = [1, 15, 16, 17, 300, 1024, 5, 700]
    cache = KVCache(
        mx.array(rng.standard_normal((n_kv, num_blocks * bs, head_dim))).astype(dtype),
        mx.array(rng.standard_normal((n_kv, num_blocks * bs, head_dim))).astype(dtype),
        bs,
    )
    tables = random_tables(rng, contexts, bs, num_blocks)
    q = mx.array(rng.standard_normal((len(contexts), n_heads, head_dim))).astype(dtype)
    with mx.stream(mx.cpu):
        cpu_cache = KVCache(cache.k.astype(mx.float32), cache.v.astype(mx.float32), bs)
    got, want = kernel_and_gather(
        q, cache, tables, contexts, window, cpu_cache, unroll=unroll, vector_loads=vector, keys=keys
    )
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


@pytest.mark.skipif(not cuda_attention.available(), reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("window", [None, 100])
def test_cuda_decode_kernel_launched_as_a_compiled_step_matches_gather_path(window):
    # A compiled step knows its tables' power-of-two width alone: the kernel sizes its
    # partitions from the contexts on the device (tests/test_cuda_kernel_host.py).
    rng = np.random.default_rng(2)
    bs, num_blocks, width = 16, 512, 128  # 2,048 keys of capacity
    contexts = [1, 17, 300, 1100, 5, 700]
    cache = KVCache(
        mx.array(rng.standard_normal((8, num_blocks * bs, 128))).astype(mx.float16),
        mx.array(rng.standard_normal((8, num_blocks * bs, 128))).astype(mx.float16),
        bs,
    )
    tables = random_tables(rng, contexts, bs, num_blocks)
    tables = np.pad(tables, ((0, 0), (0, width - tables.shape[1])))
    q = mx.array(rng.standard_normal((len(contexts), 32, 128))).astype(mx.float16)
    with mx.stream(mx.cpu):
        cpu_cache = KVCache(cache.k.astype(mx.float32), cache.v.astype(mx.float32), bs)
    got, want = kernel_and_gather(q, cache, tables, contexts, window, cpu_cache, capacity=True)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "n_heads,n_kv,head_dim,want",
    [
        (32, 8, 128, 4),
        (16, 1, 128, 8),
        (16, 1, 64, 16),
        (4, 1, 256, 4),
        (12, 12, 64, 1),
        (9, 3, 64, 3),
        (8, 1, 256, 4),
        (28, 4, 128, 7),
    ],
)
def test_a_cuda_block_serves_the_query_heads_of_one_kv_head(
    n_heads: int, n_kv: int, head_dim: int, want: int
):
    got = cuda_decode.heads_per_block(n_heads, n_kv, head_dim)
    assert got == want
    assert (n_heads // n_kv) % got == 0  # never two KV heads in one block


@pytest.mark.parametrize(
    "cases",
    [
        [(0, 9)],
        [(7, 8)],
        [(0, 5), (3, 4), (16, 17), (4, 13), (0, 1), (9, 30)],
        [(c - 1, c) for c in [1 + (i * 37) % 97 for i in range(34)]] + [(0, 6)],
    ],
)
@pytest.mark.parametrize("fused", [False, True], ids=["gather-matmul", "gather-sdpa"])
@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "contiguous"])
def test_latent_cache_matches_dense(cases: list[tuple[int, int]], fused: bool, contiguous: bool):
    """A latent cache (multi-head latent attention): one K pool of 12 dims and no V pool,
    each key's first 8 dims its value; every query head attends to the one latent head."""
    dk, dv = 12, 8
    rng = np.random.default_rng(1)
    free = list(range(NUM_BLOCKS))[::-1] if contiguous else list(rng.permutation(NUM_BLOCKS))
    cache = KVCache(mx.zeros((1, NUM_BLOCKS * BS, dk)), None, BS, value_dim=dv)
    batch, data = [], []
    for i, (start, end) in enumerate(cases):
        seq = Sequence(i, list(range(end)), SamplingParams())
        seq.block_table = [int(free.pop()) for _ in range(-(-end // BS))]
        seq.num_computed_tokens = start
        q = rng.standard_normal((end, H, dk)).astype(np.float32)
        k = rng.standard_normal((end, 1, dk)).astype(np.float32)
        for p in range(start):
            cache.k[:, seq.block_table[p // BS] * BS + p % BS] = mx.array(k[p])
        batch.append(ScheduledSeq(seq, end - start))
        data.append((q, k, start, end))
    step = prepare(batch, PoolLayout(1, NUM_BLOCKS, BS), GatherAttention(fused=fused))
    order = [i for i, it in enumerate(batch) if it.num_new_tokens == 1]
    order.sort(key=lambda i: batch[i].seq.num_computed_tokens)
    order += [i for i, it in enumerate(batch) if it.num_new_tokens > 1]
    q = np.concatenate([data[i][0][data[i][2] :] for i in order])
    k = np.concatenate([data[i][1][data[i][2] :] for i in order])
    out = paged_attention(mx.array(q), mx.array(k), None, cache, step.meta, 0.3)
    got, offset = np.array(out), 0
    assert got.shape == (q.shape[0], H * dv)
    for i in order:
        qi, ki, start, end = data[i]
        for j, p in enumerate(range(start, end)):
            s = np.einsum("hd,td->ht", qi[p], ki[: p + 1, 0]) * 0.3
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            want = np.einsum("ht,td->hd", w, ki[: p + 1, 0, :dv]).reshape(-1)
            np.testing.assert_allclose(got[offset + j], want, atol=TOL, rtol=TOL)
        offset += end - start


def test_models_with_sinks_never_get_the_cuda_kernel(monkeypatch):
    """The kernel has no sink term: a model with sinks reads through the gather path with
    fused SDPA (which has them) even where the kernel would be chosen."""
    from nanovllm_mlx.attention import select_backend

    monkeypatch.setattr(cuda_attention, "available", lambda: True)
    assert isinstance(select_backend(), cuda_attention.CudaPagedAttention)
    chosen = select_backend(sinks=True)
    assert type(chosen) is GatherAttention  # fused on a GPU (its device decides)
    with pytest.raises(NotImplementedError, match="sinks"):
        cuda_attention.CudaPagedAttention().decode(
            mx.zeros((1, H, D)),
            None,
            None,
            1.0,
            sinks=mx.zeros((H,)),  # type: ignore[arg-type]
        )
