"""Reading a GGUF file (llama.cpp's format): its header, its tensors and metadata.

`mx.load` reads GGUF natively and keeps Q4_0, Q4_1 and Q8_0 tensors quantized, as MLX
affine triples (weight uint32, scales, biases) with group size 32. Other quantization types
it either dequantizes to float16 or cannot read, so this module checks each tensor's type in
the file header first and refuses those with a clear message.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import mlx.core as mx

# ggml_type id -> (name, weights per block, bytes per block) for the types we accept.
SUPPORTED_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),  # mx.load widens it to float16
}
# Names only, for error messages.
OTHER_TYPES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
    14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# GGUF metadata value types: struct format of the fixed-size ones; 8 is string, 9 array.
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip


class _Header:
    """The parts of a GGUF header that mx.load does not report: tensor types and extents."""

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

    def _skip(self, n: int) -> None:
        if self._pos + n > len(self._buf):
            raise EOFError
        self._pos += n

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        start = self._pos
        self._skip(n)
        return bytes(self._buf[start : self._pos]).decode("utf-8", errors="replace")

    def _value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == 8:
            return self._string()
        if kind == 9:
            item, count = self._unpack("IQ")
            if item in _SCALARS:
                self._skip(struct.calcsize("<" + _SCALARS[item]) * count)
            else:
                for _ in range(count):
                    self._value(item)
            return None
        raise ValueError(f"unknown metadata value type {kind}")

    def _parse(self) -> None:
        (magic,) = self._unpack("4s")
        if magic != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        (version,) = self._unpack("I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = self._unpack("QQ")
        alignment = 32
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("I")
            value = self._value(kind)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        self.tensors: dict[str, tuple[int, tuple[int, ...], int]] = {}
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("I")
            dims = self._unpack("Q" * n_dims)
            kind, offset = self._unpack("IQ")
            self.tensors[name] = (kind, dims, offset)
        self.data_start = -(-self._pos // alignment) * alignment


def _check_file(path: Path) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """Tensor types and sizes from the header; ValueError naming the file on any problem."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _Header(buf)
    except EOFError:
        raise ValueError(f"{path}: truncated GGUF file (the header ends early)") from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt GGUF file: {e}") from None
    unsupported = {
        name: OTHER_TYPES.get(kind, f"type {kind}")
        for name, (kind, _, _) in header.tensors.items()
        if kind not in SUPPORTED_TYPES
    }
    if unsupported:
        kinds = sorted(set(unsupported.values()))
        example = next(iter(unsupported))
        raise ValueError(
            f"{path}: unsupported GGUF quantization type(s) {', '.join(kinds)} "
            f"(e.g. tensor {example}); MLX keeps only Q4_0, Q4_1 and Q8_0 quantized "
            "(and reads F32/F16/BF16): use a Q4_0/Q4_1/Q8_0 file, or the safetensors "
            "checkpoint with --quantize 4|8"
        )
    size = path.stat().st_size
    for name, (kind, dims, offset) in header.tensors.items():
        _, block, block_bytes = SUPPORTED_TYPES[kind]
        count = 1
        for d in dims:
            count *= d
        end = header.data_start + offset + count // block * block_bytes
        if end > size:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, "
                f"the file has {size} (incomplete download?)"
            )
    return header.tensors


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """All tensors (quantized ones as weight/scales/biases) and the metadata of a GGUF."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    _check_file(path)
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError with a C++ message
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from None
    return weights, metadata


def metadata_value(v: object) -> object:
    """Metadata scalars come back from mx.load as 0-d arrays, arrays as mx arrays."""
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v
