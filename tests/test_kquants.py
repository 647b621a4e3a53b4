"""GGUF block formats against the `gguf` package's own dequantization, block by block: the
exact MLX mappings (Q4_0..Q8_0, Q4_K, Q5_K) bit for bit, the re-quantized ones (Q6_K,
Q3_K, Q2_K) within their stated error; and the bit packing against mx.dequantize."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nanovllm_mlx.loading.gguf import quants

# Byte offsets of each format's float16 fields (d, dmin/m), which random bytes would fill
# with infinities and NaNs.
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82),
}  # fmt: skip
ROWS, COLS = 6, 512  # two superblocks a row, so rows of blocks are exercised too


def random_blocks(name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[name]:
        d = rng.uniform(0.5e-3, 2e-3, n_blocks).astype(np.float16)
        raw[:, offset : offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw


def reference(name: str, raw: np.ndarray) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, COLS)


def ours(name: str, raw: np.ndarray) -> np.ndarray:
    import gguf

    value = quants.to_mlx(int(gguf.GGMLQuantizationType[name]), raw.reshape(-1), (ROWS, COLS))
    w, s, b = value
    bits = w.shape[-1] * 32 // COLS
    return np.array(mx.dequantize(w, s, b, group_size=32, bits=bits))


def n_blocks(name: str) -> int:
    block = 256 if name.endswith("_K") else 32
    return ROWS * COLS // block


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"])
def test_exact_types_equal_gguf_dequantization(name: str):
    raw = random_blocks(name, n_blocks(name))
    expected, got = reference(name, raw), ours(name, raw)
    block = 256 if name.endswith("_K") else 32
    for i in range(n_blocks(name)):  # block by block, so a failure names the block
        r, c = divmod(i * block, COLS)
        np.testing.assert_array_equal(
            got[r, c : c + block], expected[r, c : c + block], err_msg=f"{name} block {i}"
        )


@pytest.mark.parametrize("name", ["Q6_K", "Q3_K", "Q2_K"])
def test_requantized_types_within_stated_error(name: str):
    """Decoded exactly (checked through the float decoder), then re-quantized to
    REQUANT_BITS at group 32 with the relative error REQUANT_ERROR states (measured
    here on random blocks for Q3_K/Q2_K; the Q6_K figure is the real Gemma file's)."""
    import gguf

    raw = random_blocks(name, n_blocks(name))
    expected = reference(name, raw)
    _, _, block_bytes, decode = quants.REQUANTIZED[int(gguf.GGMLQuantizationType[name])]
    dense = decode(raw.reshape(-1, block_bytes)).reshape(ROWS, COLS)
    for i in range(n_blocks(name)):
        r, c = divmod(i * 256, COLS)
        np.testing.assert_array_equal(
            dense[r, c : c + 256], expected[r, c : c + 256], err_msg=f"{name} block {i}"
        )
    got = ours(name, raw)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= 1.5 * quants.REQUANT_ERROR[name], rel


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_mlx_layout(bits: int):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 128)).astype(np.uint8)
    packed = mx.array(quants.pack(codes, bits))
    ones, zeros = mx.ones((3, 4)), mx.zeros((3, 4))
    got = mx.dequantize(packed, ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(got), codes.astype(np.float32))


def test_float_types_are_exact():
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    got = np.array(quants.to_mlx(30, bf16.view(np.uint8).reshape(-1), (4, 32)))
    np.testing.assert_array_equal(got, (bf16.astype(np.uint32) << 16).view(np.float32))
    f16 = x.astype(np.float16)
    got = np.array(quants.to_mlx(1, f16.view(np.uint8).reshape(-1), (4, 32)))
    np.testing.assert_array_equal(got, f16.astype(np.float32))
