"""Saving an MLX-quantized copy of a safetensors checkpoint, loadable by `loader.load`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.loading import loader

# Tokenizer and template files worth carrying over; weights and config are rewritten.
_COPY = (
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "generation_config.json",
    "*.jinja",
)


def save_quantized(
    src: str | Path, dst: str | Path, bits: int = 4, group_size: int = 64, dtype: str = "float16"
) -> Path:
    """Quantize the HF checkpoint in `src` and write it to `dst`: model.safetensors in the
    MLX module layout (metadata format "mlx"), config.json with mlx-lm's "quantization"
    entry, and the tokenizer files. Layers whose input width is not a multiple of
    group_size stay in `dtype`."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"the quantized copy would overwrite its source {src}")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    options = loader.LoadOptions(dtype=dtype, quantize=bits, group_size=group_size)
    loaded = loader.load_hf_dir(src, options)
    weights = dict(nn.utils.tree_flatten(loaded.model.parameters()))
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(loaded.config)
    config["quantization"] = {"group_size": group_size, "bits": bits}
    config["torch_dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for pattern in _COPY:
        for file in src.glob(pattern):
            if file.is_file():
                shutil.copy2(file, dst / file.name)
    return dst
