"""Our few-row 4-bit product (models/cuda_qmv.py): the kernel, run on the host through
cuda_host.HostKernel and on the GPU where there is one, computes MLX's affine 4-bit
matmul within its dtype's rounding; the layer sends only the products it can compute
there (up to ROUTED_ROWS rows); adopt() takes MLX's affine 4-bit linear layers and nothing
else; and on CUDA an engine's decode logprobs with it stay within three times what MLX's
own decode differs from its prefill."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from cuda_host import on_the_host

from benchmarks.qmv_logprobs import forced_logprobs  # the benchmark's comparison
from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention.cuda import on_gpu
from nanovllm_mlx.loading.loader import LoadOptions, load
from nanovllm_mlx.models import cuda_qmv

CUDA = pytest.mark.skipif(not on_gpu(), reason="needs MLX's CUDA backend")
EPS = {mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch):
    """cuda_qmv's kernel built and run on the host (tests/cuda_host.py)."""
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler")
    with on_the_host(monkeypatch, cuda_qmv._kernel):
        yield


def problem(m: int, n: int, k: int, group: int, dtype: mx.Dtype, seed: int = 0) -> tuple:
    """x [m, k] and a 4-bit weight [n, k] quantized by MLX, scales in x's dtype."""
    mx.random.seed(seed)
    w, scales, biases = mx.quantize(mx.random.normal((n, k)) * 0.05, group_size=group, bits=4)
    x = mx.random.normal((m, k)).astype(dtype)
    return x, w, scales.astype(dtype), biases.astype(dtype)


def check(y: mx.array, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group: int):
    """y against the float32 product of the same x and dequantized weight, within what the
    kernel's rounding may cost: pair products and sums in x's dtype (relative eps each,
    a few deep) over sum |x| * scale * code, then the output's own rounding."""
    s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
    w32 = mx.dequantize(w, s32, b32, group_size=group, bits=4)
    x32 = x.astype(mx.float32)
    ref = x32 @ w32.T
    # |scale * code|: MLX's scale is negative where a group's bias is its largest value
    scaled_codes = mx.abs(w32 - mx.repeat(b32, group, axis=1))
    bound = 4 * EPS[x.dtype] * (mx.abs(x32) @ scaled_codes.T) + EPS[x.dtype] * mx.abs(ref)
    err = mx.abs(y.astype(mx.float32) - ref)
    assert y.shape == ref.shape and y.dtype == x.dtype
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the rounding bound (max |err| {err.max().item()})"


# (rows of x, weight rows, input width, group, weight rows a warp, steps in flight): one
# and several rows of x; weight rows not a multiple of a block's; widths under one step a
# lane (96) and over (640), and 70 steps, so that a lane's last load of two is past the
# row (2240); every group size; 1, 2, 4 and 8 rows a warp; 1 to 3 steps in flight.
CASES = [
    (1, 40, 256, 64, None, 2),
    (1, 33, 640, 32, 4, 1),
    (3, 17, 384, 128, 2, 2),
    (8, 12, 96, 32, 1, 2),
    (5, 70, 512, 64, 4, 3),
    (2, 9, 2240, 64, 2, 2),
    (8, 20, 256, 64, 8, 1),
]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}g{c[3]}" for c in CASES])
def test_the_kernel_computes_mlx_quantized_matmul_on_the_host(
    host: None, dtype: mx.Dtype, case: tuple
):
    m, n, k, group, rows, in_flight = case
    x, w, scales, biases = problem(m, n, k, group, dtype)
    y = cuda_qmv.qmv(x, w, scales, biases, group, rows=rows, in_flight=in_flight)
    check(y, x, w, scales, biases, group)


def test_large_activations_keep_their_precision_on_the_host(host: None):
    """Channels of a few hundred (what RMSNorm's outputs reach in real models): the
    float16 pair sums cover 32 values at most, so nothing overflows or drifts."""
    x, w, scales, biases = problem(2, 24, 2048, 64, mx.float16, seed=1)
    x = x * mx.where(mx.arange(2048) % 97 == 0, 300.0, 1.0).astype(mx.float16)
    y = cuda_qmv.qmv(x, w, scales, biases, 64)
    assert mx.isfinite(y).all().item()
    check(y, x, w, scales, biases, 64)


def test_the_layer_sends_only_what_the_kernel_computes(host: None, monkeypatch: pytest.MonkeyPatch):
    calls: list[Any] = []
    kernel = cuda_qmv._kernel()  # the host's

    def counted(**call: Any) -> list[mx.array]:
        calls.append(call["template"])
        return kernel(**call)

    monkeypatch.setattr(cuda_qmv, "_kernel", lambda: counted)
    layer = nn.Linear(128, 24)
    nn.quantize(layer := nn.Sequential(layer), group_size=64, bits=4)
    assert cuda_qmv.adopt(layer) == 1
    linear = layer.layers[0]
    linear.update(
        {
            "scales": linear.scales.astype(mx.float16),
            "biases": linear.biases.astype(mx.float16),
            "bias": linear.bias.astype(mx.float16),
        }
    )
    mx.random.seed(2)
    rows_past = cuda_qmv.ROUTED_ROWS + 1  # MLX's tiled matmul is faster there
    for rows, through_kernel in ((1, True), (cuda_qmv.ROUTED_ROWS, True), (rows_past, False)):
        x = mx.random.normal((1, rows, 128)).astype(mx.float16)
        before = len(calls)
        y = linear(x)
        assert (len(calls) > before) is through_kernel, rows
        ref = nn.QuantizedLinear.__call__(linear, x.astype(mx.float32))
        assert y.shape == (1, rows, 24)
        assert mx.allclose(y.astype(mx.float32), ref, atol=2e-2).item(), rows
    before = len(calls)
    linear(mx.ones((1, 128)))  # float32: MLX's own
    assert len(calls) == before
    # No rows: never a kernel of M = 0 (MLX's own CPU product of no rows dies of SIGFPE, so
    # the routing is asked, not the layer)
    assert not cuda_qmv.routed(mx.zeros((0, 128), dtype=mx.float16), linear)
    tied = nn.Sequential(nn.Embedding(24, 128))
    nn.quantize(tied, group_size=64, bits=4)
    assert cuda_qmv.adopt(tied) == 1
    embedding = tied.layers[0]
    embedding.update(
        {
            "scales": embedding.scales.astype(mx.float16),
            "biases": embedding.biases.astype(mx.float16),
        }
    )
    x = mx.random.normal((1, 2, 128)).astype(mx.float16)
    before = len(calls)
    y = embedding.as_linear(x)
    assert len(calls) == before + 1 and y.shape == (1, 2, 24)
    ref = nn.QuantizedEmbedding.as_linear(embedding, x.astype(mx.float32))
    assert mx.allclose(y.astype(mx.float32), ref, atol=2e-2).item()
    assert embedding(mx.array([3])).shape == (1, 128)  # lookups stay MLX's


def test_long_products_take_the_dequantized_weights_dense_matmul(
    monkeypatch: pytest.MonkeyPatch,
):
    # Prompt chunks (DENSE_ROWS rows or more) dequantize the weights and multiply densely:
    # the same product as MLX's 4-bit matmul up to rounding, with the layer's bias.
    monkeypatch.setattr(cuda_qmv, "DENSE_ROWS", 16)
    layer = nn.Sequential(nn.Linear(128, 24))
    nn.quantize(layer, group_size=64, bits=4)
    assert cuda_qmv.adopt(layer) == 1
    linear = layer.layers[0]
    mx.random.seed(3)
    for rows, dense in ((15, False), (16, True), (40, True)):
        x = mx.random.normal((1, rows, 128))
        assert cuda_qmv.dense(x) is dense
        ref = nn.QuantizedLinear.__call__(linear, x)
        y = linear(x)
        assert y.shape == ref.shape == (1, rows, 24)
        assert mx.allclose(y, ref, atol=1e-4).item(), rows
    monkeypatch.setattr(cuda_qmv, "DENSE_ROWS", 0)  # off: never
    assert not cuda_qmv.dense(mx.zeros((4096, 128)))


def test_adopt_takes_affine_4bit_linear_layers_only():
    model = nn.Sequential(
        nn.Linear(128, 64),  # 4 bits, group 64: taken
        nn.Linear(128, 64),  # 8 bits: MLX's
        nn.Linear(128, 64),  # mxfp4: no biases, MLX's
        nn.Embedding(10, 128),  # taken
        nn.Linear(128, 64),  # group 32: taken
    )
    for i, (group, bits, mode) in enumerate(
        [
            (64, 4, "affine"),
            (64, 8, "affine"),
            (32, 4, "mxfp4"),
            (64, 4, "affine"),
            (32, 4, "affine"),
        ]
    ):
        nn.quantize(
            model, group, bits, mode=mode, class_predicate=lambda p, m, i=i: p == f"layers.{i}"
        )
    assert cuda_qmv.adopt(model) == 3
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "FewRowsQuantizedLinear",
        "QuantizedLinear",
        "QuantizedLinear",
        "FewRowsQuantizedEmbedding",  # its as_linear: a tied output layer
        "FewRowsQuantizedLinear",
    ]
    assert cuda_qmv.adopt(model) == 0  # already taken


def test_only_an_mlx_cuda_build_on_its_gpu_adopts(
    llama_q4_tiny: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(cuda_qmv, "on_gpu", lambda: True)
    monkeypatch.setenv("NANOVLLM_CUDA_QMV", "0")
    assert not cuda_qmv.enabled()
    monkeypatch.delenv("NANOVLLM_CUDA_QMV")
    assert cuda_qmv.enabled()
    kept = LoadOptions(keep_quantized=True)  # as on a GPU
    loaded = load(str(llama_q4_tiny), kept)
    kinds = {type(m).__name__ for _, m in loaded.model.named_modules()}
    assert "FewRowsQuantizedLinear" in kinds and "our CUDA kernel" in loaded.quantization
    monkeypatch.setattr(cuda_qmv, "on_gpu", lambda: False)
    assert not cuda_qmv.enabled()
    loaded = load(str(llama_q4_tiny), kept)
    kinds = {type(m).__name__ for _, m in loaded.model.named_modules()}
    assert "FewRowsQuantizedLinear" not in kinds and "CUDA" not in loaded.quantization


# (rows of x, weight rows a warp, group): each a kernel NVRTC builds (~1 s on a fresh machine)
GPU_CASES = [(1, 1, 64), (1, 4, 64), (3, 2, 64), (8, 1, 64), (8, 4, 64), (1, 2, 32), (2, 4, 128)]


@CUDA
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("rows,per_warp,group", GPU_CASES)
def test_on_the_gpu_the_kernel_computes_mlx_quantized_matmul(
    dtype: mx.Dtype, rows: int, per_warp: int, group: int
):
    x, w, scales, biases = problem(rows, 1000, 4096, group, dtype, seed=rows)
    check(cuda_qmv.qmv(x, w, scales, biases, group, rows=per_warp), x, w, scales, biases, group)


@CUDA
def test_an_engines_decode_logprobs_with_the_kernel_are_near_the_mlx_paths(
    llama3_8b_q4: Path, monkeypatch: pytest.MonkeyPatch
):
    """Greedy decode of one and of three sequences at once (one and three rows a product)
    through the kernel: its chosen tokens' logprobs against the same tokens read by MLX's
    matmul as a prompt (teacher-forced: no divergence to follow), within three times what
    MLX's own decode differs from its prefill. On the 8B shape: the tiny fixtures fail
    inside MLX's CUDA graph at their first prefill, with or without the kernel (RESULTS.md,
    v14). Measured: 0.015-0.023 on average against a floor of 0.008-0.013."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (7, 19, 33)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
    engine = {"dtype": "float16", "kv_cache_gb": 2, "max_model_len": 4096}
    monkeypatch.delenv("NANOVLLM_CUDA_QMV", raising=False)
    llm = LLM(str(llama3_8b_q4), **engine)
    kinds = {type(m).__name__ for _, m in llm.engine.model_runner.model.named_modules()}
    assert "FewRowsQuantizedLinear" in kinds
    ours = [llm.generate([prompts[0]], greedy)[0], *llm.generate(prompts, greedy)[1:]]
    del llm
    monkeypatch.setenv("NANOVLLM_CUDA_QMV", "0")
    ref = LLM(str(llama3_8b_q4), **engine)
    for prompt, out in zip(prompts, ours):
        own = ref.generate([prompt], greedy)[0]
        floor = np.abs(np.array(own["logprobs"]) - forced_logprobs(ref, prompt, own["token_ids"]))
        diff = np.abs(np.array(out["logprobs"]) - forced_logprobs(ref, prompt, out["token_ids"]))
        assert diff.mean() <= 3 * floor.mean() + 1e-3, (diff.mean(), floor.mean())
        assert diff.max() <= 3 * floor.max() + 1e-2, (diff.max(), floor.max())
