"""How K and V are stored in the pools: a float dtype, or codes with their scales.

A quantized row is one token of one KV head, quantized at write time in groups along
head_dim: the group never spans tokens, so a partly filled block is never quantized again
as tokens are appended, and the scales sit beside the codes under the same pool-row
indexing (attention/kv_cache.py), so every block operation (gather, copy-on-write,
preemption, sliding-window frees, head sharding) treats them alike.

Scales (and affine biases) are bfloat16, which unlike float16 does not overflow for rows
past 65504 x 127 in a float32 model. Its 8-bit mantissa costs no accuracy: codes are
computed from the *stored* scale and bias, and each is rounded outward first (the scale up,
the bias down, by 2^-8 > bfloat16's 2^-9 rounding), so the grid still covers the row and
no code clips (an affine int8 row's top values lost a whole step to the rounding before).

Why these formats (`benchmarks/kv_quant_quality.py --study`, RESULTS.md "Quantized KV
cache"; mean |logprob difference| from the float32 cache over 1,000 tokens of SmolLM2,
head_dim 64). The targets, >= 1.9x float16's tokens for int8 and >= 3.5x for int4, set the
bit budget at head_dim 64:
- int8: symmetric, one scale a row, 8 + 16/64 = 8.25 bits (1.94x): 0.034. Affine in groups
  of 64 (8.5 bits, 1.88x: misses the target) gave 0.023.
- int4: affine (scale and bias) in groups of 64, 4.5 bits (3.56x): 0.41; groups of 32 (5
  bits, 3.20x: misses the target) 0.28; symmetric, one scale a row (4.25 bits) 0.68.
- Both turned by a Hadamard transform first (rotate): int8 0.034 -> 0.017, int4 0.41 ->
  0.26, better than the formats that miss the budget. Keys carry a few large channels; a
  per-token group spends its range on them and rounds the rest coarsely, and the turned
  row spreads them out. Costs no bytes, and a [D, D] product per query and per output
  (the readers turn q and o, not the keys; attention/gather.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

SCALE_DTYPE = mx.bfloat16
OUTWARD = 1 + 2.0**-8  # see above: rounds a scale up and a bias down past bfloat16's error
FLOAT_NAMES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True, slots=True)
class KVFormat:
    """One pool's storage: `dtype` for a float pool, else `bits`-bit codes in groups of
    `group` values (whole row when the head_dim is not a multiple) with a bfloat16 scale,
    and a bias too when `affine`."""

    name: str
    dtype: mx.Dtype | None = None
    bits: int = 0
    group: int = 0
    affine: bool = False
    # Rows are turned by an orthonormal Hadamard transform before quantizing and back
    # after: a few large channels (common in keys) are spread over the whole row.
    rotate: bool = False

    @property
    def quantized(self) -> bool:
        return self.dtype is None

    def group_size(self, head_dim: int) -> int:
        return self.group if self.group and head_dim % self.group == 0 else head_dim

    def code_width(self, head_dim: int) -> int:
        """Elements of the codes array per row (bytes for int4's packed pairs)."""
        return head_dim * self.bits // 8

    def scale_width(self, head_dim: int) -> int:
        """Elements of the scales array per row: a scale (and a bias) per group."""
        return (head_dim // self.group_size(head_dim)) * (2 if self.affine else 1)

    def row_bytes(self, head_dim: int) -> int:
        """Bytes one token of one KV head takes in the pool, scales included."""
        if self.dtype is not None:
            return head_dim * self.dtype.size
        return self.code_width(head_dim) + self.scale_width(head_dim) * SCALE_DTYPE.size


INT8 = KVFormat("int8", bits=8, rotate=True)
INT4 = KVFormat("int4", bits=4, group=64, affine=True, rotate=True)
QUANTIZED = {"int8": INT8, "int4": INT4}


def resolve(name: str, compute: mx.Dtype) -> KVFormat:
    """A --kv-cache-dtype value (validated by Config) -> its format; auto is the compute
    dtype, the pools as they were before quantization existed."""
    if name == "auto":
        return KVFormat(str(compute).removeprefix("mlx.core."), dtype=compute)
    if name in QUANTIZED:
        return QUANTIZED[name]
    return KVFormat(name, dtype=FLOAT_NAMES[name])


def check_head_dim(fmt: KVFormat, head_dim: int) -> None:
    if fmt.quantized and head_dim % 2:
        raise ValueError(f"kv_cache_dtype {fmt.name} needs an even head_dim, got {head_dim}")


@lru_cache(maxsize=8)
def hadamard(d: int) -> mx.array:
    """An orthonormal, symmetric [d, d] transform (its own inverse): Sylvester Hadamard
    blocks of the largest power of two dividing d, down the diagonal."""
    n = d & -d
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return mx.array(np.kron(np.eye(d // n), h / np.sqrt(n)).astype(np.float32))


@lru_cache(maxsize=16)
def _hadamard_in(d: int, dtype: mx.Dtype) -> mx.array:
    # Built with its data in the compute dtype: an astype per layer and step would be one
    # more op each time, and a compiled step captures it as a constant.
    return mx.array(np.asarray(hadamard(d)), dtype=dtype)


def turn(x: mx.array, on: bool) -> mx.array:
    """x [..., D] turned by hadamard (in x's dtype) when on, else x. Keys stored turned
    meet a turned q (qH . kH = q . k), and values stored turned give a turned output,
    turned back by the same product (H is its own inverse), so readers turn q and the
    output rather than every key and value they read."""
    return x @ _hadamard_in(x.shape[-1], x.dtype) if on else x


def quantize(x: mx.array, fmt: KVFormat) -> tuple[mx.array, mx.array]:
    """x [..., D] -> (codes [..., code_width], scales [..., scale_width])."""
    d = x.shape[-1]
    g = fmt.group_size(d)
    x = x.astype(mx.float32)
    if fmt.rotate:
        x = x @ hadamard(d)
    xg = x.reshape(*x.shape[:-1], d // g, g)
    top = (1 << (fmt.bits - 1)) - 1  # 127 / 7: the symmetric grid's largest code
    if fmt.affine:
        lo, hi = xg.min(axis=-1, keepdims=True), xg.max(axis=-1, keepdims=True)
        scale = ((hi - lo) / ((1 << fmt.bits) - 1) * OUTWARD).astype(SCALE_DTYPE)
        bias = (lo - mx.abs(lo) * (OUTWARD - 1)).astype(SCALE_DTYPE)
        s, b = scale.astype(mx.float32), bias.astype(mx.float32)
        codes = mx.round((xg - b) / mx.where(s == 0, 1, s))
        codes = mx.clip(codes, 0, (1 << fmt.bits) - 1)
        scales = mx.concatenate([scale[..., 0], bias[..., 0]], axis=-1)  # [scales, biases]
    else:
        scale = (mx.abs(xg).max(axis=-1, keepdims=True) / top * OUTWARD).astype(SCALE_DTYPE)
        s = scale.astype(mx.float32)
        codes = mx.clip(mx.round(xg / mx.where(s == 0, 1, s)), -top, top)
        scales = scale
        if fmt.bits == 4:
            codes = codes + 8  # nibbles are unsigned
    codes = codes.reshape(*x.shape[:-1], d)
    scales = scales.reshape(*x.shape[:-1], -1)
    if fmt.bits == 8:
        return codes.astype(mx.uint8 if fmt.affine else mx.int8), scales
    pairs = codes.astype(mx.uint8).reshape(*x.shape[:-1], d // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), scales


def dequantize(
    codes: mx.array, scales: mx.array, fmt: KVFormat, dtype: mx.Dtype, rotated: bool = False
) -> mx.array:
    """Inverse of quantize: (codes [..., code_width], scales [..., scale_width]) -> [..., D]
    in `dtype`. Only what is passed is dequantized: the readers pass what they gathered.
    rotated: leave a rotating format's rows turned (attention turns q and o instead, a
    [D, D] product per query rather than per key)."""
    lead = codes.shape[:-1]
    if fmt.bits == 4:
        c = mx.stack([codes & 15, codes >> 4], axis=-1).reshape(*lead, -1)
    else:
        c = codes
    d = c.shape[-1]
    g = fmt.group_size(d)
    c = c.astype(dtype).reshape(*lead, d // g, g)
    if fmt.affine:
        n = scales.shape[-1] // 2
        s = scales[..., :n, None].astype(dtype)
        b = scales[..., n:, None].astype(dtype)
        out = (c * s + b).reshape(*lead, d)
    else:
        if fmt.bits == 4:
            c = c - 8
        out = (c * scales[..., None].astype(dtype)).reshape(*lead, d)
    return turn(out, fmt.rotate and not rotated)
