"""A 4-bit quantized linear layer's product for a few rows (one decoding sequence, or a
small batch) as our own CUDA kernel, reading each weight once.

On an H100 (Llama 3 8B's shape, 4 bits, group 64, float16) MLX's own one-row kernel took
5.7 ms of a 6.8 ms decode step: 225 launches reading ~4.15 GB, ~0.73 TB/s of the
device's ~3.35 (benchmarks/logs/h100_llama3_8b_q4_v10_anatomy.log). mlx-lm pays the same,
so the weights' reads set both engines' single-stream speed. Its kernel gives each lane
16 values (8 bytes) of a row per load and keeps its sums in the compute dtype; this one
gives a lane 32 values (a 16-byte load) of each of R rows at once, so a warp has R times
more bytes in flight, and turns codes into half-precision pairs with integer operations:
(code | 0x6400) is the float16 1024 + code, minus 1024 exact (0x4300, 128, for
bfloat16). Each row's sum is kept as sum(x * code) * scale + sum(x) * bias, the codes'
products in pairs of the compute dtype over at most 32 values, the rest in float32.

For several rows of x (a decode batch) the weights stay in registers while each row of x
is read (from L1: every warp of a block reads the same x); MLX's CUDA build runs its
one-row kernel for up to 7 rows (a row per grid slice, each reading the weights again) and
a tiled matmul with tensor cores from 8 (for groups narrower than the row, as in every
mlx-community checkpoint: its Hopper matmul wants one group a row).

Measured on an H100 (benchmarks/logs/h100_*_v14_*.log): one stream of the 8B shape
decoded at 192.2 / 165.3 tok/s after 32 / 8,192 tokens with it and 166.1 / 123.4
without; side by side with mlx-lm, 1.22x / 1.18x / 1.06x after 32 / 2k / 8k tokens. By
rows (benchmarks/qmm_rows.py, a layer's seven products): 2 / 3 / 4 rows 1.65x / 2.18x /
2.53x MLX's time, 8 rows 0.51x (MLX's tiled matmul has tensor cores) alone, not in the
engine's step (ROUTED_ROWS).
Teacher-forced logprobs of its decode differ from MLX's prefill by 0.015-0.023 on average
where MLX's own decode differs by 0.008-0.013 (benchmarks/qmv_logprobs.py).

Checked on the host against MLX's quantized matmul (tests/test_cuda_qmv.py, through
tests/cuda_host.py) and on the GPU by the same tests.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.cuda import on_gpu
from nanovllm_mlx.buckets import bucket
from nanovllm_mlx.models.cuda_qmv_source import HEADER, SOURCE

WARPS = 4
STEPS_IN_FLIGHT = 2  # U: a lane's 16-byte steps loaded before any is multiplied
MAX_ROWS = 8  # rows of x a launch takes: the M template constant (registers grow with it)
# Rows of x the layers send here. Alone, MLX's tiled matmul takes 8 rows in half our
# time (0.124 against 0.250 ms a layer, joined projections: h100_llama3_8b_q4_v18_rows.log),
# but in the engine's compiled step its 8-row products took 11.7 ms of a 14.2 ms step and
# ours made the step 10.6 ms (8 sequences after 512 tokens, same H100): so all of a decode
# bucket's 8 rows come here. NANOVLLM_QMV_ROWS (0 to MAX_ROWS) sets it, for measuring.
ROUTED_ROWS = min(max(int(os.environ.get("NANOVLLM_QMV_ROWS", "8")), 0), MAX_ROWS)
# Rows from which a product dequantizes its weights and multiplies them with the dense
# matmul (cuBLAS, tensor cores at full rate) instead of MLX's 4-bit tiled matmul: a prompt
# chunk of thousands of rows reads the weights once either way, and the dense product's
# rate is what sets the prefill's time. On an H100, a Llama 3 8B layer's four joined
# products: 256 / 512 / 2,048 rows 0.68 / 0.79 / 1.75 ms against MLX's 0.81 / 1.54 /
# 6.05; the engine's TTFT at 4k / 16k tokens 0.148 / 0.720 s against 0.455 / 1.915
# (benchmarks/logs/h100_v20_dense-8b.log). The dequantized weights live one product at
# a time (235 MB for the joined gate/up of that layer). NANOVLLM_DENSE_ROWS sets it; 0:
# never. Only CUDA builds adopt these layers (loader.py), where MLX's 4-bit matmul lacks
# tensor-core tiles for groups narrower than a row; Metal keeps MLX's.
DENSE_ROWS = max(int(os.environ.get("NANOVLLM_DENSE_ROWS", "256")), 0)


def rows_per_warp(n_out: int, n_rows: int = 1) -> int:
    """Weight rows a warp reads together: four where that still leaves thousands of
    warps (an H100 has 132 SMs of up to 64 warps each), fewer for narrow layers (Llama 3
    8B's k/v projections: 1,024 rows). One row of x (with STEPS_IN_FLIGHT 2) is what the
    engine was measured with; each product alone, four rows a warp with one step in
    flight was the fastest on every shape of the 8B layer (0.123 ms for its seven
    products against 0.137 with these and 0.173 with MLX's), not measured in the engine.
    Several rows of x share a warp's dequantized codes, so there every joined projection
    of the 8B layer was fastest at four rows a warp or more (qmm_rows.py --joined, a
    layer's four joined products, ms: at 4 rows 0.165 with four a warp against 0.186 with
    the one-row choice, at 8 rows 0.239 against 0.288; eight a warp within ~10% of four)."""
    if n_out >= 8192 or (n_rows > 1 and n_out >= 4096):
        return 4
    return 2 if n_out >= 4096 else 1


@cache
def _kernel() -> Any:
    return mx.fast.cuda_kernel(
        name="qmv_rows",
        input_names=["x", "w", "scales", "biases"],
        output_names=["out"],
        source=SOURCE,
        header=HEADER,
    )


def computes_format(bits: int, group_size: int) -> bool:
    """The codes qmv() reads: 4 bits (MLX's affine layout), groups of 32, 64 or 128."""
    return bits == 4 and group_size in (32, 64, 128)


def rows_of(x: mx.array) -> int:
    """The rows of x's product: every axis but its last (0 for an empty x)."""
    return x.size // max(x.shape[-1], 1)


def supports(x: mx.array, w: mx.array, scales: mx.array, bits: int, group_size: int) -> bool:
    """Whether qmv() computes this product: codes it reads (computes_format), a float16
    or bfloat16 x with as many rows as MAX_ROWS at most, scales of x's dtype."""
    k_in = x.shape[-1]
    return (
        computes_format(bits, group_size)
        and w.ndim == 2
        and x.dtype in (mx.float16, mx.bfloat16)
        and scales.dtype == x.dtype
        and k_in % 32 == 0
        and w.shape[1] * 8 == k_in
        and rows_of(x) <= MAX_ROWS
    )


def qmv(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int = 64,
    rows: int | None = None,
    in_flight: int | None = None,
) -> mx.array:
    """x @ dequantize(w).T for x [..., K] with at most MAX_ROWS rows, w [N, K / 8] uint32
    (MLX's affine 4-bit layout), scales and biases [N, K / group_size]: [..., N] in x's
    dtype. rows: weight rows a warp takes (rows_per_warp by default); in_flight: steps a
    lane loads at once (STEPS_IN_FLIGHT by default)."""
    lead, k_in = x.shape[:-1], x.shape[-1]
    n_rows = rows_of(x)
    n_out = w.shape[0]
    r = rows or rows_per_warp(n_out, n_rows)
    warps_needed = -(-n_out // r)
    blocks = -(-warps_needed // WARPS)
    # Row counts padded to the compiled decode buckets' (buckets.bucket), which the
    # start-up's warm-up builds: each new count is a kernel NVRTC builds on first use
    # (about 2 s on an H100: a mixed step sampling 3, 5, 6 or 7 rows took 2.1-3.5 s the
    # first time, benchmarks/logs/h100_llama3_8b_q4_v18_buckets.log; in v19's 8-request
    # rounds no step built one). Weights are read once whatever the rows, so the padding
    # costs little.
    m = bucket(n_rows)
    x2 = x.reshape(n_rows, k_in)
    if m != n_rows:
        x2 = mx.pad(x2, [(0, m - n_rows), (0, 0)])
    (out,) = _kernel()(
        inputs=[x2, w, scales, biases],
        template=[
            ("T", x.dtype),
            ("G", group_size),
            ("R", r),
            ("M", m),
            ("WARPS", WARPS),
            ("U", in_flight or STEPS_IN_FLIGHT),
            ("FLUSH_WORDS", 4 if x.dtype == mx.float16 else 1),
        ],
        grid=(32 * WARPS * blocks, 1, 1),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(m, n_out)],
        output_dtypes=[x.dtype],
    )
    return (out if m == n_rows else out[:n_rows]).reshape(*lead, n_out)


class FewRowsQuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer, whose products of up to ROUTED_ROWS rows take qmv()
    (decode steps); longer ones (prefill) MLX's own matmul."""

    def __call__(self, x: mx.array) -> mx.array:
        if dense(x):
            w = mx.dequantize(
                self["weight"], self["scales"], self["biases"], self.group_size, self.bits
            )
            y = x @ w.astype(x.dtype).T
        elif routed(x, self):
            y = qmv(x, self["weight"], self["scales"], self["biases"], self.group_size)
        else:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


class FewRowsQuantizedEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding whose use as the output layer (tied weights: as_linear)
    takes qmv() for up to ROUTED_ROWS rows; lookups are MLX's."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not routed(x, self):
            return super().as_linear(x)
        return qmv(x, self["weight"], self["scales"], self["biases"], self.group_size)


def enabled() -> bool:
    """On an MLX CUDA build running on its GPU, unless NANOVLLM_CUDA_QMV=0."""
    return os.environ.get("NANOVLLM_CUDA_QMV", "1") != "0" and on_gpu()


def dense(x: mx.array) -> bool:
    """Whether a product of x takes the dequantized weights' dense matmul (DENSE_ROWS)."""
    return 0 < DENSE_ROWS <= rows_of(x)


def routed(x: mx.array, layer: nn.Module) -> bool:
    """Whether a layer's product with x takes qmv(): ROUTED_ROWS rows at most (decode
    steps of up to that many sequences; prefill and larger batches stay MLX's)."""
    rows = rows_of(x)
    return 0 < rows <= ROUTED_ROWS and supports(
        x, layer["weight"], layer["scales"], layer.bits, layer.group_size
    )


ADOPTED = {
    nn.QuantizedLinear: FewRowsQuantizedLinear,
    nn.QuantizedEmbedding: FewRowsQuantizedEmbedding,
}


def adopt(model: nn.Module) -> int:
    """Give qmv() the few-row products of every affine 4-bit linear layer (and tied
    output layer) it can compute: MLX's own classes exactly, so tensor-parallel shards
    and experts keep theirs; returns how many layers. The layers keep their arrays: only
    the class changes, so nothing is re-initialised or copied."""
    count = 0
    for _, module in model.named_modules():
        few_rows = ADOPTED.get(type(module))
        if (
            few_rows is not None
            and module.mode == "affine"
            and computes_format(module.bits, module.group_size)
            and "biases" in module
        ):
            module.__class__ = few_rows
            count += 1
    return count
