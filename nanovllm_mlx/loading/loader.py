"""Load a model (an HF directory of config.json + safetensors, or a GGUF file) into MLX."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.loading import download, gguf
from nanovllm_mlx.loading.quantization import dequantize_model, quantize_like, quantize_model
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.models import (
    gemma3,
    gemma4,
    gpt2,
    gpt_oss,
    granitemoe,
    llama,
    mixtral,
    phi3,
    qwen3,
    qwen3_moe,
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """What to do with the weights on the way in (the engine options that concern loading)."""

    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on a GPU
    quantize: int | None = None  # quantize float weights to this many bits
    group_size: int = 64
    keep_quantized: bool | None = None  # None: keep on a GPU, dequantize on CPU


@dataclass(slots=True)
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: dict
    dtype: mx.Dtype
    name: str
    quantization: str = "float"  # what loading did about quantization, for --verbose

    @property
    def weight_bytes(self) -> int:
        return sum(p.nbytes for _, p in nn.utils.tree_flatten(self.model.parameters()))


def resolve_dtype(dtype: str, config: dict) -> mx.Dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if mx.default_device() == mx.cpu:
        return mx.float32  # float16/bfloat16 matmul is slow on CPU
    saved = config.get("torch_dtype") or config.get("dtype") or "float16"
    return DTYPES.get(saved, mx.float16)


def read_safetensors(path: Path) -> tuple[dict[str, mx.array], bool]:
    """All tensors of model.safetensors or of the shards its index names, and whether MLX
    wrote them (metadata format "mlx", as mlx-lm and save_quantized do): those are already
    in the MLX module layout."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    weights: dict[str, mx.array] = {}
    formats = set()
    for name in files:
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"{file} is named in the index but missing")
        try:
            tensors, metadata = mx.load(str(file), return_metadata=True)
        except Exception as e:  # MLX raises RuntimeError/ValueError with a C++ message
            raise ValueError(f"cannot read {file}: corrupt or truncated safetensors ({e})") from e
        weights.update(tensors)
        formats.add(metadata.get("format"))
    return weights, formats == {"mlx"}


# config.json's model_type -> the module holding its ModelArgs and Model.
ARCHITECTURES = {
    "gpt2": gpt2,
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "qwen3": qwen3,
    "gemma3": gemma3,  # the multimodal checkpoint: its text model only
    "gemma3_text": gemma3,
    "phi3": phi3,
    "mixtral": mixtral,
    "qwen3_moe": qwen3_moe,
    "granitemoe": granitemoe,
    "gpt_oss": gpt_oss,
    "gemma4": gemma4,  # the multimodal checkpoint: its text model only
    "gemma4_text": gemma4,
}


def build_model(config: dict) -> nn.Module:
    """The architecture named by config.json's model_type, with random weights."""
    model_type = config.get("model_type")
    module = ARCHITECTURES.get(model_type)
    if module is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    return module.Model(module.ModelArgs.from_dict(config))


def load_weights(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    expected = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights in {source} do not fit the model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    params = dict(nn.utils.tree_flatten(model.parameters()))
    for key, value in weights.items():
        if value.shape != params[key].shape:
            raise ValueError(
                f"weight {key} in {source} has shape {value.shape}, expected {params[key].shape}"
            )
    model.load_weights(list(weights.items()), strict=True)


def cast(model: nn.Module, dtype: mx.Dtype) -> None:
    model.update(
        nn.utils.tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e


def _finish(
    model: nn.Module, config: dict, options: LoadOptions, prequantized: bool
) -> tuple[mx.Dtype, str]:
    """Cast, quantize or dequantize as asked; returns the dtype and what was done to the
    weights' quantization, in words for --verbose."""
    mx_dtype = resolve_dtype(options.dtype, config)
    cast(model, mx_dtype)
    how = "float"
    keep_quantized = options.keep_quantized
    if options.quantize:
        if prequantized:
            raise ValueError("the model's weights are already quantized: drop --quantize")
        quantize_model(model, options.quantize, options.group_size)
        how = f"quantized to {options.quantize} bits at load"
    elif prequantized:
        if keep_quantized is None:
            keep_quantized = mx.default_device() != mx.cpu
        if keep_quantized:
            how = "kept quantized"
        else:
            kept = dequantize_model(model, mx_dtype)
            how = f"dequantized to {str(mx_dtype).removeprefix('mlx.core.')} at load"
            if kept:
                how += f", {kept} expert layers kept quantized"
    mx.eval(model.parameters())
    return mx_dtype, how


def load_hf_dir(path: Path, options: LoadOptions) -> LoadedModel:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    config = read_config(path)
    model = build_model(config)
    weights, mlx_layout = read_safetensors(path)
    # MLX-written files need no layout changes, only mlx-lm's `model.` wrapper removed.
    if mlx_layout:
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    else:
        weights = model.sanitize(weights)
    prequantized = any(k.endswith(".scales") for k in weights)
    if prequantized:
        quantize_like(model, weights, path)
    load_weights(model, weights, path)
    mx_dtype, how = _finish(model, config, options, prequantized)
    tokenizer = Tokenizer.from_dir(path, config)
    return LoadedModel(model, tokenizer, config, mx_dtype, path.name, how)


def load_gguf(path: Path, options: LoadOptions) -> LoadedModel:
    weights, config, tokenizer = gguf.read_model(path)
    model = build_model(config)
    prequantized = any(k.endswith(".scales") for k in weights)
    quantize_like(model, weights, path)
    load_weights(model, weights, path)
    mx_dtype, how = _finish(model, config, options, prequantized)
    return LoadedModel(model, tokenizer, config, mx_dtype, path.stem, how)


def load(model: str | None = None, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """A model by path (HF directory, .gguf file, or a directory holding one .gguf), by a
    name already downloaded to the models directory, or the default model for None."""
    path = download.resolve(model)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise ValueError(f"{path} holds several .gguf files ({names}): name one of them")
        if ggufs:
            path = ggufs[0]
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf: give a .gguf file or a model directory"
            )
        return load_gguf(path, options)
    return load_hf_dir(path, options)
