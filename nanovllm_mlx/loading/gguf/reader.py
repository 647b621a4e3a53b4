"""Reading a GGUF file (llama.cpp's format): its metadata and its tensors.

`mx.load` reads GGUF, but only keeps Q4_0/Q4_1/Q8_0 quantized and fails on a file holding
a K-quant (`gguf_tensor_to_f16 failed` on gemma-3-270m-q4_k_m.gguf). So the header is
parsed here and every tensor is read from a memory map of the file through its offset;
loading/gguf/quants.py turns the blocks into MLX arrays. A file is checked whole (types,
extents) before any tensor is read, so a bad one fails with one clear message.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from nanovllm_mlx.loading.gguf import quants

# Metadata value types: struct format of the fixed-size ones; 8 is string, 9 array.
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_NUMPY = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
# Names of the types this reader refuses, for its error message.
OTHER_TYPES = {
    9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
}  # fmt: skip
SUPPORTED = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4"

TensorInfo = tuple[int, tuple[int, ...], int]  # ggml type, dims (innermost first), offset


class _Header:
    """Metadata (values as plain Python) and tensor infos of a GGUF file."""

    def __init__(self, buf: bytes | mmap.mmap):
        self._buf = buf
        self._pos = 0
        self._parse()

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self._pos + size > len(self._buf):
            raise EOFError
        values = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += size
        return values

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            raise EOFError
        start, self._pos = self._pos, self._pos + n
        return bytes(self._buf[start : self._pos])

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        return self._take(n).decode("utf-8", errors="replace")

    def _value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == 8:
            return self._string()
        if kind == 9:
            item, count = self._unpack("IQ")
            if item in _NUMPY:
                # One read for a 262k-entry score table instead of a struct call per entry.
                size = np.dtype(_NUMPY[item]).itemsize
                return np.frombuffer(self._take(size * count), _NUMPY[item]).tolist()
            return [self._value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")

    def _parse(self) -> None:
        (magic,) = self._unpack("4s")
        if magic != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        (version,) = self._unpack("I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = self._unpack("QQ")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("I")
            self.metadata[key] = self._value(kind)
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            alignment = 32
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("I")
            dims = self._unpack("Q" * n_dims)
            kind, offset = self._unpack("IQ")
            self.tensors[name] = (kind, dims, offset)
        self.data_start = -(-self._pos // alignment) * alignment


def _count(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _check(path: Path, header: _Header, size: int) -> None:
    unsupported = {
        name: OTHER_TYPES.get(kind, f"type {kind}")
        for name, (kind, dims, _) in header.tensors.items()
        if quants.tensor_bytes(kind, _count(dims)) is None
    }
    if unsupported:
        kinds = sorted(set(unsupported.values()))
        example = next(iter(unsupported))
        raise ValueError(
            f"{path}: unsupported GGUF quantization type(s) {', '.join(kinds)} "
            f"(e.g. tensor {example} is {unsupported[example]}); supported: {SUPPORTED}. "
            "Use a file in one of those, or the safetensors checkpoint with --quantize 4|8"
        )
    for name, (kind, dims, offset) in header.tensors.items():
        end = header.data_start + offset + quants.tensor_bytes(kind, _count(dims))
        if end > size:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, "
                f"the file has {size} (incomplete download?)"
            )
        block = 1 if kind in quants.FLOATS else 32
        if dims[0] % block:
            raise ValueError(
                f"{path}: tensor {name} rows of {dims[0]} do not split into {block}-weight "
                f"blocks of its type {quants.type_name(kind)}"
            )


def _read_tensors(buf: mmap.mmap, header: _Header) -> dict[str, mx.array]:
    # Its own function so that no numpy view of the map outlives it (the map cannot close
    # while one exists); mx.array copies what it is given.
    data = np.frombuffer(buf, dtype=np.uint8)
    weights: dict[str, mx.array] = {}
    for name, (kind, dims, offset) in header.tensors.items():
        start = header.data_start + offset
        raw = data[start : start + quants.tensor_bytes(kind, _count(dims))]
        value = quants.to_mlx(kind, raw, tuple(reversed(dims)))
        if isinstance(value, tuple):
            stem = name.removesuffix(".weight")
            for suffix, part in zip(("weight", "scales", "biases"), value):
                weights[f"{stem}.{suffix}"] = part
        else:
            weights[name] = value
    mx.eval(list(weights.values()))
    return weights


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """All tensors and the metadata of a GGUF file. A quantized tensor NAME.weight comes
    back as NAME.weight (packed uint32), NAME.scales and NAME.biases, MLX's layout (an
    MXFP4 one without biases: MLX's mxfp4 mode)."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if path.stat().st_size == 0:  # mmap refuses an empty file with a message naming none
        raise ValueError(f"{path}: truncated GGUF file (the header ends early)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            header = _Header(buf)
        except EOFError:
            raise ValueError(f"{path}: truncated GGUF file (the header ends early)") from None
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt GGUF file: {e}") from None
        _check(path, header, len(buf))
        weights = _read_tensors(buf, header)
    return weights, header.metadata


def metadata_value(v: object) -> object:
    """A metadata value as plain Python (mx.load once returned 0-d arrays; kept for
    callers that pass values from elsewhere)."""
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v
