"""Load a model directory (config.json, safetensors, tokenizer) into MLX."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.models import gpt2
from nanovllm_mlx.tokenizer import Tokenizer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(slots=True)
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: dict
    dtype: mx.Dtype
    name: str


def resolve_dtype(dtype: str, config: dict) -> mx.Dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if mx.default_device() == mx.cpu:
        return mx.float32  # float16/bfloat16 matmul is slow on CPU
    saved = config.get("torch_dtype") or config.get("dtype") or "float16"
    return DTYPES.get(saved, mx.float16)


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """All tensors of model.safetensors or of the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    weights: dict[str, mx.array] = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"{file} is named in the index but missing")
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # MLX raises RuntimeError/ValueError with a C++ message
            raise ValueError(f"cannot read {file}: corrupt or truncated safetensors ({e})") from e
    return weights


def build_model(config: dict) -> nn.Module:
    """The architecture named by config.json's model_type, with random weights."""
    model_type = config.get("model_type")
    if model_type == "gpt2":
        return gpt2.Model(gpt2.ModelArgs.from_dict(config))
    raise ValueError(f"unsupported model_type {model_type!r} (supported: gpt2)")


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


def load_hf_dir(
    path: Path, dtype: str = "auto", quantize: int | None = None, group_size: int = 64
) -> LoadedModel:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    model = build_model(config)
    weights = model.sanitize(read_safetensors(path))
    load_weights(model, weights, path)
    mx_dtype = resolve_dtype(dtype, config)
    cast(model, mx_dtype)
    if quantize:
        nn.quantize(model, group_size=group_size, bits=quantize)
    mx.eval(model.parameters())
    tokenizer = Tokenizer.from_dir(path, config)
    return LoadedModel(model, tokenizer, config, mx_dtype, path.name)


def load(
    model: str, dtype: str = "auto", quantize: int | None = None, group_size: int = 64
) -> LoadedModel:
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: give a local directory with config.json and "
            f"*.safetensors (fetch one with `nanovllm download {model}`)"
        )
    return load_hf_dir(path, dtype, quantize, group_size)
