"""One layer's KV pools (KVCache): what is written into them and how each reader gets
float K/V back out, for float and quantized pools alike (attention/kv_quant.py).

Pools are head-major, [n_kv_heads, num_blocks * block_size, width] per layer (width:
head_dim for a float pool, the codes' width for a quantized one, beside a scales pool
[n_kv_heads, slots, scale_width]). Every pool of a layer has the same row indexing
(PoolLayout in attention/metadata.py), so a write row or a block row addresses codes and
scales alike, and copying a block copies both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from nanovllm_mlx.attention.kv_quant import KVFormat, dequantize, quantize


def read_blocks(pool: mx.array, rows: mx.array, batch: int, block_size: int) -> mx.array:
    """Whole blocks, one contiguous row each: gathering the same keys slot by slot was
    5-6x slower on CPU (0.27 vs 0.06 ms for one sequence of 160 keys, 27 vs 4.2 ms for 32
    of 512; 12 heads of 64)."""
    n_kv, _, d = pool.shape
    blocks = mx.take(pool.reshape(-1, block_size * d), rows, axis=0)
    return blocks.reshape(n_kv, batch, -1, d)  # [Hkv, B, L, width]


def make_pool(
    fmt: KVFormat, n_kv_heads: int, slots: int, head_dim: int
) -> tuple[mx.array, mx.array | None]:
    """A zeroed pool (and its scales, for a quantized format). Zero codes with zero scales
    read back as zeros, so unwritten slots (padding, the scratch block) stay harmless."""
    if fmt.dtype is not None:
        return mx.zeros((n_kv_heads, slots, head_dim), dtype=fmt.dtype), None
    code_dtype = mx.int8 if fmt.bits == 8 and not fmt.affine else mx.uint8
    codes = mx.zeros((n_kv_heads, slots, fmt.code_width(head_dim)), dtype=code_dtype)
    scales = mx.zeros((n_kv_heads, slots, fmt.scale_width(head_dim)), dtype=mx.bfloat16)
    return codes, scales


@dataclass(slots=True)
class KVCache:
    """One layer's K and V pools. k/v hold the values of a float pool, or the codes of a
    quantized one with k_scales/v_scales beside them (formats says which).

    A separate pool per layer, and no other references to it, lets MLX scatter into the
    buffer in place instead of copying it every step.

    A latent cache (multi-head latent attention, DeepSeek-V3) has no V pool (v None): each
    key's first value_dim dims are its value, so the compressed KV is stored once. Its
    values are sliced off the keys when they are read, never kept as a view of the pool (a
    view is a second reference, which would make every write copy the pool). Latent
    caches are float only.
    """

    k: mx.array
    v: mx.array | None
    block_size: int
    k_scales: mx.array | None = None
    v_scales: mx.array | None = None
    formats: tuple[KVFormat, KVFormat] | None = None  # None: float pools in any dtype
    value_dim: int | None = None  # v None: values are keys[..., :value_dim]
    # The token of this step's in-place write (attention/cuda_write.py), which the kernel
    # reading the pools takes as an input so that the device runs the read after it.
    written: mx.array | None = None

    @classmethod
    def allocate(
        cls,
        formats: tuple[KVFormat, KVFormat],
        n_kv_heads: int,
        slots: int,
        head_dim: int,
        block_size: int,
        value_dim: int | None = None,
    ) -> KVCache:
        """value_dim: a latent cache (no V pool, the keys' first value_dim dims are the
        values); float formats only."""
        k, ks = make_pool(formats[0], n_kv_heads, slots, head_dim)
        if value_dim is not None:
            if ks is not None:
                raise ValueError(
                    "a quantized KV cache is not supported for multi-head latent attention "
                    "(DeepSeek-V3) yet: use --kv-cache-dtype auto"
                )
            return cls(k, None, block_size, None, None, formats, value_dim)
        v, vs = make_pool(formats[1], n_kv_heads, slots, head_dim)
        return cls(k, v, block_size, ks, vs, formats)

    @property
    def quantized(self) -> bool:
        return self.k_scales is not None or self.v_scales is not None

    @property
    def rotated(self) -> tuple[bool, bool]:
        """Whether K and V are stored turned by kv_quant.hadamard: a reader that asks for
        rotated rows turns the queries (K) and the output (V) instead."""
        f = self.formats
        return (False, False) if f is None else (f[0].rotate, f[1].rotate)

    def arrays(self) -> list[mx.array]:
        """Every pool, for mx.eval and for a compiled step's inputs and outputs."""
        pools = (self.k, self.v, self.k_scales, self.v_scales)
        return [p for p in pools if p is not None]

    def with_arrays(self, arrays: list[mx.array]) -> KVCache:
        """This cache's structure over other arrays, in arrays()'s order."""
        rest = list(arrays)
        k = rest.pop(0)
        v = rest.pop(0) if self.v is not None else None
        ks = rest.pop(0) if self.k_scales is not None else None
        vs = rest.pop(0) if self.v_scales is not None else None
        return KVCache(k, v, self.block_size, ks, vs, self.formats, self.value_dim)

    def set_arrays(self, arrays: list[mx.array]) -> None:
        new = self.with_arrays(arrays)
        self.k, self.v, self.k_scales, self.v_scales = new.k, new.v, new.k_scales, new.v_scales

    def _pools(self) -> list[tuple[str, str, KVFormat | None]]:
        f = self.formats
        return [("k", "k_scales", f[0] if f else None), ("v", "v_scales", f[1] if f else None)]

    def write(self, k: mx.array, v: mx.array | None, rows: mx.array) -> None:
        """k/v [T, Hkv, D] into the rows given by PoolLayout.write_rows, quantized first
        for a quantized pool (only these T rows: nothing already written is touched).

        One Scatter per pool, in place when MLX can donate the buffer, which it does as the
        pool has no other reference (decode speed does not depend on the pool's size).
        pool[:, slots] = ... is ten ops per write, and on a GPU each op is host time in a
        single-stream decode step."""
        if (self.v is None) != (v is None):
            raise ValueError("v must be None exactly when the cache is latent (no V pool)")
        self.written = None  # this step's write is MLX's own, ordered by MLX
        for (name, scale_name, fmt), new in zip(self._pools(), (k, v)):
            if new is None:
                continue
            if fmt is not None and fmt.quantized:
                codes, scales = quantize(new, fmt)
                self._scatter(scale_name, scales, rows)
                self._scatter(name, codes, rows)
            else:
                self._scatter(name, new, rows)

    def _scatter(self, name: str, new: mx.array, rows: mx.array) -> None:
        pool = getattr(self, name)
        width = pool.shape[-1]
        flat = pool.reshape(-1, width)
        flat[rows] = new.reshape(-1, width).astype(pool.dtype)
        setattr(self, name, flat.reshape(pool.shape))

    def values_of(self, keys: mx.array, read: Callable[[], mx.array]) -> mx.array:
        """The values matching `keys` (already read from the K pool): read() from the V
        pool, or a latent cache's leading value_dim dims of the keys themselves."""
        if self.v is None:
            return keys[..., : self.value_dim]
        return read()

    def read_blocks(
        self, which: int, rows: mx.array, batch: int, dtype: mx.Dtype, rotated: bool = False
    ) -> mx.array:
        """K (which=0) or V (1) of the blocks at rows, as [Hkv, B, L, D] in dtype: a
        quantized pool dequantizes just these blocks, never a float copy of the pool.
        rotated: as stored, turned (see `rotated`)."""
        name, scale_name, fmt = self._pools()[which]
        values = read_blocks(getattr(self, name), rows, batch, self.block_size)
        if fmt is None or not fmt.quantized:
            return values.astype(dtype)
        scales = read_blocks(getattr(self, scale_name), rows, batch, self.block_size)
        return dequantize(values, scales, fmt, dtype, rotated)

    def read_slots(
        self, which: int, start: int, end: int, dtype: mx.Dtype, rotated: bool = False
    ) -> mx.array:
        """K or V of pool slots [start, end) of every head, [Hkv, L, D] in dtype: a strided
        view of a float pool (nothing copied), or those slots dequantized."""
        name, scale_name, fmt = self._pools()[which]
        values: mx.array = getattr(self, name)[:, start:end]
        if fmt is None or not fmt.quantized:
            return values if values.dtype == dtype else values.astype(dtype)
        scales = getattr(self, scale_name)[:, start:end]
        return dequantize(values, scales, fmt, dtype, rotated)

    def copy_blocks(self, src: mx.array, dst: mx.array, num_rows: int) -> None:
        """Copy whole blocks (rows of the [Hkv * num_blocks, block] view, num_rows of
        them in all) from src to dst rows, in every pool: codes and scales together."""
        for name in ("k", "v", "k_scales", "v_scales"):
            pool = getattr(self, name)
            if pool is None:
                continue
            blocks = pool.reshape(num_rows, -1)
            blocks[dst] = blocks[src]
            setattr(self, name, blocks.reshape(pool.shape))
