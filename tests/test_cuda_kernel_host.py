"""The CUDA paged decode kernel, whole (attention/cuda_decode.py's launcher, its partial and merge
kernels), run on the host (tests/cuda_host.py: thread blocks as std::threads) against the
gather path: partitions, grouped-query blocks, the online softmax and its merge, float
and quantized pools, lanes holding a row's dims 32 apart or consecutive (vector loads),
one key a warp at a time or two side by side over 16 lanes each.
What a GPU adds (tests/test_attention.py, tests/test_cuda_kv_quant.py): its rounding,
its memory model, MLX's own wrapping and graphs."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from cuda_host import on_the_host
from helpers import filled_cache, kernel_and_gather, random_tables

from nanovllm_mlx.attention import cuda_decode, cuda_formats
from nanovllm_mlx.attention.kv_quant import INT4, INT8, KVFormat, resolve

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")


@pytest.fixture
def host_kernels(monkeypatch: pytest.MonkeyPatch):
    with on_the_host(monkeypatch, cuda_decode._kernels):
        yield


# (K format, V format, compute dtype, (heads, kv heads, head_dim), window, vector loads)
CASES = [
    ("auto", "auto", "float32", (32, 8, 128), None, False),  # Llama 3's heads
    ("auto", "auto", "float32", (32, 8, 128), None, True),
    ("auto", "auto", "float16", (16, 1, 128), 100, True),  # two blocks a KV head, window
    ("auto", "auto", "float32", (7, 7, 80), None, True),  # not a multiple of 32: strided
    ("int8", "int4", "float16", (32, 8, 128), None, False),
    ("int8", "int4", "float16", (32, 8, 128), None, True),
    ("int4", "int8", "float32", (4, 1, 256), 100, True),  # Gemma 3's heads
    ("int8", "int8", "float32", (4, 2, 96), None, True),  # 3 dims a lane: turned outside
]


@pytest.mark.parametrize("keys", [1, 2], ids=["one-key", "two-keys"])
@pytest.mark.parametrize("turns", [False, True], ids=["turned-around", "turned-inside"])
@pytest.mark.parametrize("k,v,dtype,shape,window,vector", CASES)
def test_the_kernel_on_the_host_reads_as_the_gather_path(
    host_kernels,
    monkeypatch: pytest.MonkeyPatch,
    keys: int,
    turns: bool,
    k: str,
    v: str,
    dtype: str,
    shape: tuple[int, int, int],
    window: int | None,
    vector: bool,
):
    if turns and "int" not in k + v:
        pytest.skip("float pools are not stored turned")
    if keys == 2 and not (vector and shape[2] in (64, 128)):
        pytest.skip("two keys side by side: vector loads of head_dim 64 or 128")
    if keys == 2 and not turns and "int" in k + v:
        pytest.skip("two keys over quantized pools: with the default turns (suite time)")
    monkeypatch.setattr(cuda_formats, "TURNS_IN_KERNEL", turns)
    compute = getattr(mx, dtype)
    n_heads, n_kv, d = shape
    formats: tuple[KVFormat, KVFormat] = (
        {"int8": INT8, "int4": INT4}.get(k) or resolve(k, compute),
        {"int8": INT8, "int4": INT4}.get(v) or resolve(v, compute),
    )
    rng = np.random.default_rng(7)
    bs, contexts = 16, [1, 15, 16, 17, 300, 5, 70]
    num_blocks = sum(-(-c // bs) for c in contexts) + 4
    cache, _ = filled_cache(formats, n_kv, num_blocks, bs, d)
    tables = random_tables(rng, contexts, bs, num_blocks)
    q = mx.array(rng.standard_normal((len(contexts), n_heads, d))).astype(compute)
    # A few partitions a sequence, few host threads.
    got, want = kernel_and_gather(
        q, cache, tables, contexts, window, vector_loads=vector, target_blocks=64, keys=keys
    )
    tol = 1e-4 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_a_compiled_steps_partitions_split_its_longest_context_not_its_capacity(
    host_kernels, monkeypatch: pytest.MonkeyPatch
):
    # A compiled step knows only its tables' capacity, a power-of-two width of up to twice
    # the longest context (32k prompts on an H100 ran on 64k-key tables). Partitions sized
    # by the capacity left half of them empty while each other one read twice the keys
    # in turn; sized on the device by the contexts, every partition of the longest has keys.
    partial, merge = cuda_decode._kernels()
    part_m: list[np.ndarray] = []

    def recording(**launch):
        outs = partial(**launch)
        part_m.append(np.array(outs[1]))
        return outs

    monkeypatch.setattr(cuda_decode, "_kernels", lambda: (recording, merge))
    rng = np.random.default_rng(3)
    bs, width, contexts = 16, 32, [300, 5]  # capacity 512 keys; 300 is past half of it
    cache, _ = filled_cache((resolve("auto", mx.float32),) * 2, 2, 80, bs, 64)
    tables = random_tables(rng, contexts, bs, 80)
    tables = np.pad(tables, ((0, 0), (0, width - tables.shape[1])))  # a compiled step's
    q = mx.array(rng.standard_normal((2, 8, 64))).astype(mx.float32)
    args = (q, cache.k, cache.v, mx.array(tables), mx.array(contexts, dtype=mx.int32), bs, 0.125)
    exact = cuda_decode.paged_decode(*args, max(contexts), target_blocks=64)
    by_lens = cuda_decode.paged_decode(*args, width * bs, target_blocks=64, capacity=True)
    by_capacity = cuda_decode.paged_decode(*args, width * bs, target_blocks=64)
    np.testing.assert_allclose(np.array(by_lens), np.array(exact), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(by_capacity), np.array(exact), atol=1e-5, rtol=1e-5)
    sized_by_lens, sized_by_capacity = part_m[1][0], part_m[2][0]  # the 300-key sequence
    assert sized_by_lens.shape == sized_by_capacity.shape and sized_by_lens.shape[-1] > 2
    assert np.isfinite(sized_by_lens).all()
    assert not np.isfinite(sized_by_capacity).all()  # what the size by capacity left empty


def test_the_merge_takes_more_partitions_than_it_has_threads(host_kernels):
    # The merge reads the partitions' maxima and weights head_dim at a time (one a thread):
    # 79 partitions over a 64-thread block take two rounds, the second a partial one.
    rng = np.random.default_rng(5)
    bs, contexts, d = 16, [2500], 64
    num_blocks = -(-contexts[0] // bs) + 2
    cache, _ = filled_cache((resolve("auto", mx.float32),) * 2, 1, num_blocks, bs, d)
    tables = random_tables(rng, contexts, bs, num_blocks)
    q = mx.array(rng.standard_normal((1, 2, d))).astype(mx.float32)
    got, want = kernel_and_gather(q, cache, tables, contexts, None, target_blocks=128)
    assert cuda_decode.num_partitions(1, 1, contexts[0], 128)[0] > d
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
