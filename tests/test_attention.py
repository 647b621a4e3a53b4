"""Paged attention against dense causal attention, for decode, prefill and chunks after a
cached prefix, all in one mixed batch with scattered block tables."""

import mlx.core as mx
import numpy as np
import pytest

from nanovllm_mlx.attention import KVCache, paged_attention
from nanovllm_mlx.model_runner import prepare
from nanovllm_mlx.sampling_params import SamplingParams
from nanovllm_mlx.scheduler import ScheduledSeq
from nanovllm_mlx.sequence import Sequence

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 64


def dense(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal attention of queries at positions start.. over keys 0..; GQA by repetition."""
    rep = H // HKV
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    out = np.empty((q.shape[0], H, D), dtype=np.float64)
    for i in range(q.shape[0]):
        p = start + i
        s = np.einsum("hd,thd->ht", q[i], k[: p + 1]) / np.sqrt(D)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[i] = np.einsum("ht,thd->hd", w, v[: p + 1])
    return out.reshape(q.shape[0], H * D)


@pytest.mark.parametrize(
    "cases",
    [
        [(0, 9)],  # one fresh prompt
        [(7, 8)],  # one decode
        [(0, 5), (3, 4), (16, 17), (4, 13), (0, 1), (9, 30)],  # mixed batch
        [(8, 12), (12, 20)],  # chunks after cached prefixes, at block boundaries
    ],
)
def test_paged_matches_dense(cases: list[tuple[int, int]]):
    rng = np.random.default_rng(0)
    free = list(rng.permutation(NUM_BLOCKS))  # scattered, non-contiguous blocks
    cache = KVCache(mx.zeros((NUM_BLOCKS * BS, HKV, D)), mx.zeros((NUM_BLOCKS * BS, HKV, D)), BS)
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
            cache.k[slot] = mx.array(k[p])
            cache.v[slot] = mx.array(v[p])
        batch.append(ScheduledSeq(seq, end - start))
        data.append((q, k, v, start, end))
    step = prepare(batch, BS)
    # Flat order: single-token entries first, then the others, each in batch order.
    order = [i for i, it in enumerate(batch) if it.num_new_tokens == 1]
    order += [i for i, it in enumerate(batch) if it.num_new_tokens > 1]
    q = np.concatenate([data[i][0][data[i][3] :] for i in order])
    k = np.concatenate([data[i][1][data[i][3] :] for i in order])
    v = np.concatenate([data[i][2][data[i][3] :] for i in order])
    out = paged_attention(mx.array(q), mx.array(k), mx.array(v), cache, step.meta, D**-0.5)
    mx.eval(out)
    got, offset = np.array(out), 0
    for i in order:
        qi, ki, vi, start, end = data[i]
        n = end - start
        np.testing.assert_allclose(
            got[offset : offset + n], dense(qi[start:], ki, vi, start), atol=1e-5, rtol=1e-4
        )
        offset += n
    assert offset == got.shape[0]
