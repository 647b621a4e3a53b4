"""GGUF tensor blocks -> MLX arrays: float tensors as they are, quantized ones as MLX affine
triples (packed codes, scales, biases) wherever the format allows it exactly.

MLX's affine quantization stores w = scale * q + bias per group of 32/64/128 weights of a
row, with q of 2-8 bits packed little-endian into uint32 words. These ggml formats are
exactly that at group 32, so they stay quantized with no loss beyond rounding scale and bias
to the compute dtype (exact in float32):

    Q4_0  w = d * (q - 8)             4 bits    Q4_1  w = d * q + m           4 bits
    Q5_0  w = d * (q - 16)            5 bits    Q5_1  w = d * q + m           5 bits
    Q8_0  w = d * q, q signed         8 bits (q + 128, bias -128 d)
    Q4_K  w = d*sc_j * q - dmin*m_j   4 bits (8 sub-blocks of 32 per 256-superblock)
    Q5_K  the same with 5-bit q       5 bits

Q6_K, Q3_K and Q2_K scale every 16 weights, a group size MLX's kernels do not have: they
are dequantized and re-quantized to REQUANT_BITS at group 32 (error in REQUANT_ERROR).
Every conversion is vectorised numpy over all blocks of a tensor (no Python loop per block).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

QK_K = 256  # weights per K-quant superblock

# Re-quantization of the 16-weight-group formats, chosen by measured error: relative L2
# error of the re-quantized weights against the file's own dequantized ones. Q6_K on the 9
# ffn_down tensors of gemma-3-270m-q4_k_m.gguf (worst of them), Q3_K/Q2_K on random blocks
# (tests/test_kquants.py); at 4/5/6/8 bits:
#   Q6_K  8.5e-2 / 4.2e-2 / 2.0e-2 / 5.0e-3   (6 bits adds as much noise as Q6_K has)
#   Q3_K  7.7e-2 / 3.4e-2 / 1.2e-2 / 4.4e-3
#   Q2_K  4.8e-2 / 2.4e-2 / 1.1e-2 / 2.7e-3
# so 8 bits for all three (memory: 8 + 64/32 bits a weight with float32 scale and bias).
REQUANT_BITS = {"Q6_K": 8, "Q3_K": 8, "Q2_K": 8}
REQUANT_ERROR = {"Q6_K": 5.0e-3, "Q3_K": 4.4e-3, "Q2_K": 2.7e-3}

Triple = tuple[mx.array, mx.array, mx.array]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [rows, cols] (< 2**bits) -> MLX's packing, uint32 [rows, cols*bits/32]:
    a little-endian bit stream, code i at bit i * bits."""
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes.astype(np.uint8)).view(np.uint32)
    # n codes fill whole bytes: 8 codes of 3 or 5 bits, 4 of 6 or 2, 2 of 4.
    n = 8 // np.gcd(bits, 8)
    nbytes = n * bits // 8
    c = codes.reshape(rows, cols // n, n).astype(np.uint64)
    word = np.zeros(c.shape[:2], dtype=np.uint64)
    for i in range(n):
        word |= c[..., i] << np.uint64(i * bits)
    out = word.view(np.uint8).reshape(rows, cols // n, 8)[..., :nbytes]
    return np.ascontiguousarray(out).reshape(rows, -1).view(np.uint32)


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 [n_blocks, 1]."""
    return raw[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, k] bytes -> [n, 2k]: the low nibbles of all k bytes, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """[n, count/8] bytes -> [n, count] single bits, bit j of the little-endian stream."""
    return np.unpackbits(packed, axis=-1, bitorder="little")[:, :count]


# Each decoder takes the blocks [n_blocks, block_bytes] and returns codes [n_blocks,
# weights] (uint8) with scales and biases [n_blocks, weights / 32] (float32).
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def _q4_0(raw: np.ndarray) -> Decoded:
    d = _f16(raw, 0)
    return _nibbles(raw[:, 2:18]), d, -8 * d


def _q4_1(raw: np.ndarray) -> Decoded:
    return _nibbles(raw[:, 4:20]), _f16(raw, 0), _f16(raw, 2)


def _q5(raw: np.ndarray, offset: int) -> np.ndarray:
    high = _bits(raw[:, offset : offset + 4], 32)
    return _nibbles(raw[:, offset + 4 : offset + 20]) | (high << 4)


def _q5_0(raw: np.ndarray) -> Decoded:
    d = _f16(raw, 0)
    return _q5(raw, 2), d, -16 * d


def _q5_1(raw: np.ndarray) -> Decoded:
    return _q5(raw, 4), _f16(raw, 0), _f16(raw, 2)


def _q8_0(raw: np.ndarray) -> Decoded:
    d = _f16(raw, 0)
    codes = (raw[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, -128 * d


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per superblock. Bytes
    0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; scales/mins 4-7 are the nibbles of bytes
    8-11 with their top 2 bits in the spare top bits of bytes 0-3 / 4-7."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_codes4(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 four-bit codes: each 32-byte chunk gives a sub-block of its low
    nibbles, then one of its high nibbles."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(n, QK_K)


def _q4_k(raw: np.ndarray) -> Decoded:
    sc, m = _k_scales(raw[:, 4:16])
    return _k_codes4(raw[:, 16:144]), _f16(raw, 0) * sc, -_f16(raw, 2) * m


def _q5_k(raw: np.ndarray) -> Decoded:
    sc, m = _k_scales(raw[:, 4:16])
    n = raw.shape[0]
    # Bit s of high-bit byte i is the fifth bit of weight i of sub-block s.
    high = np.unpackbits(raw[:, 16:48], axis=-1, bitorder="little").reshape(n, 32, 8)
    codes = _k_codes4(raw[:, 48:176]) | (high.transpose(0, 2, 1).reshape(n, QK_K) << 4)
    return codes, _f16(raw, 0) * sc, -_f16(raw, 2) * m


# The 16-weight-group formats decode straight to float32 [n_blocks, 256].


def _deq_q6_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    ql, qh = raw[:, 0:128].reshape(n, 2, 64), raw[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1).reshape(n, 2, 4, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.float32).reshape(n, 16, 16) - 32
    scales = raw[:, 192:208].view(np.int8).astype(np.float32)
    return (_f16(raw, 208)[:, :, None] * scales[:, :, None] * q).reshape(n, QK_K)


def _deq_q3_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    packed = raw[:, 96:108]
    low, high = packed[:, 0:8], packed[:, 8:12]
    # 16 six-bit scales: low nibbles of bytes 0-7 then their high nibbles, with the top two
    # bits from bytes 8-11, two bits per scale in scale order, byte (j % 4), shift 2*(j//4).
    nib = np.concatenate([low & 0x0F, low >> 4], axis=-1)
    j = np.arange(16)
    top = (high[:, j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    scales = ((nib | (top << 4)).astype(np.int16) - 32).astype(np.float32)
    qs = raw[:, 32:96].reshape(n, 2, 1, 32)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(n, QK_K).astype(np.int16)
    # A clear high-mask bit means the code is 4 lower (weight i of sub-block s: bit s of
    # mask byte i % 32, sub-blocks of 32 in order).
    mask = np.unpackbits(raw[:, 0:32], axis=-1, bitorder="little").reshape(n, 32, 8)
    q -= 4 * (1 - mask.transpose(0, 2, 1).reshape(n, QK_K).astype(np.int16))
    d = _f16(raw, 108)[:, :, None] * scales[:, :, None]
    return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _deq_q2_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    packed = raw[:, 0:16]
    qs = raw[:, 16:80].reshape(n, 2, 1, 32)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(n, 16, 16).astype(np.float32)
    scale = _f16(raw, 80) * (packed & 0x0F).astype(np.float32)
    low = _f16(raw, 82) * (packed >> 4).astype(np.float32)
    return (scale[:, :, None] * q - low[:, :, None]).reshape(n, QK_K)


# ggml type id -> (name, weights per block, bytes per block, bits, decoder)
AFFINE: dict[int, tuple[str, int, int, int, Callable[[np.ndarray], Decoded]]] = {
    2: ("Q4_0", 32, 18, 4, _q4_0),
    3: ("Q4_1", 32, 20, 4, _q4_1),
    6: ("Q5_0", 32, 22, 5, _q5_0),
    7: ("Q5_1", 32, 24, 5, _q5_1),
    8: ("Q8_0", 32, 34, 8, _q8_0),
    12: ("Q4_K", QK_K, 144, 4, _q4_k),
    13: ("Q5_K", QK_K, 176, 5, _q5_k),
}
REQUANTIZED: dict[int, tuple[str, int, int, Callable[[np.ndarray], np.ndarray]]] = {
    10: ("Q2_K", QK_K, 84, _deq_q2_k),
    11: ("Q3_K", QK_K, 110, _deq_q3_k),
    14: ("Q6_K", QK_K, 210, _deq_q6_k),
}
FLOATS = {0: ("F32", np.float32), 1: ("F16", np.float16), 30: ("BF16", None)}
# MXFP4 (gpt-oss's experts): blocks of 32 E2M1 codes under one E8M0 exponent, the same
# numbers as MLX's mxfp4 mode, which keeps them: [e, 16 bytes], the byte j holding code j
# (low nibble) and code j + 16 (high); MLX wants the codes in order, two a byte.
MXFP4, MXFP4_BYTES = 39, 17


def _mxfp4(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[mx.array, mx.array]:
    lead, cols = shape[:-1], shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    blocks = raw.reshape(-1, MXFP4_BYTES)
    codes = _nibbles(blocks[:, 1:])
    weight = pack(codes.reshape(rows, cols), 4)
    return mx.array(weight.reshape(*lead, -1)), mx.array(blocks[:, 0].reshape(*lead, cols // 32))


def type_name(kind: int) -> str:
    if kind == MXFP4:
        return "MXFP4"
    for table in (AFFINE, REQUANTIZED, FLOATS):
        if kind in table:
            return table[kind][0]
    return f"type {kind}"


def tensor_bytes(kind: int, count: int) -> int | None:
    """Bytes a tensor of `count` weights takes; None for a type this module cannot read."""
    if kind in FLOATS:
        return count * (4 if kind == 0 else 2)
    if kind == MXFP4:
        return count // 32 * MXFP4_BYTES
    entry = AFFINE.get(kind) or REQUANTIZED.get(kind)
    if entry is None:
        return None
    return count // entry[1] * entry[2]


def to_mlx(
    kind: int, raw: np.ndarray, shape: tuple[int, ...]
) -> mx.array | Triple | tuple[mx.array, mx.array]:
    """The bytes of one tensor -> an array of `shape`, or an MLX affine triple whose
    dequantization has that shape (rows keep every leading axis: experts stay 3-D), or an
    mxfp4 pair (codes, exponents) for MXFP4."""
    if kind == MXFP4:
        return _mxfp4(raw, shape)
    if kind in FLOATS:
        if kind == 30:  # bfloat16 is the top half of a float32: widen exactly
            bits = raw.view(np.uint16).astype(np.uint32) << 16
            return mx.array(bits.view(np.float32).reshape(shape))
        return mx.array(raw.view(FLOATS[kind][1]).reshape(shape))
    cols = shape[-1]
    lead = shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    if kind in AFFINE:
        _, block, block_bytes, bits, decode = AFFINE[kind]
        codes, scales, biases = decode(raw.reshape(-1, block_bytes))
        weight = pack(codes.reshape(rows, cols), bits)
        return (
            mx.array(weight.reshape(*lead, -1)),
            mx.array(scales.reshape(*lead, cols // 32)),
            mx.array(biases.reshape(*lead, cols // 32)),
        )
    name, _, block_bytes, dequantize = REQUANTIZED[kind]
    dense = mx.array(dequantize(raw.reshape(-1, block_bytes)).reshape(rows, cols))
    w, s, b = mx.quantize(dense, group_size=32, bits=REQUANT_BITS[name])
    return w.reshape(*lead, -1), s.reshape(*lead, -1), b.reshape(*lead, -1)
