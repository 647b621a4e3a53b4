"""Load a model (an HF directory of config.json + safetensors, or a GGUF file) into MLX."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from nanovllm_mlx.errors import CheckpointLayoutError
from nanovllm_mlx.loading import download, gguf
from nanovllm_mlx.loading.quantization import dequantize_model, quantize_like, quantize_model
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.models import (
    cuda_qmv,
    deepseek_v3,
    gemma3,
    gemma4,
    gpt2,
    gpt_oss,
    granitemoe,
    llama,
    mixtral,
    phi3,
    qwen3,
    qwen3_5,
    qwen3_moe,
    smollm3,
)
from nanovllm_mlx.models.base import CausalLM

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
    "smollm3": smollm3,
    "deepseek_v3": deepseek_v3,  # also DeepSeek-R1
    "kimi_k2": deepseek_v3,  # Kimi-K2's config names DeepSeek-V3's architecture
    "qwen3_5": qwen3_5,  # the multimodal checkpoints: their text model only
    "qwen3_5_text": qwen3_5,
    "qwen3_5_moe": qwen3_5,
    "qwen3_5_moe_text": qwen3_5,
    "qwen3_next": qwen3_5,
    "gpt_oss": gpt_oss,
    "gemma4": gemma4,  # the multimodal checkpoint: its text model only
    "gemma4_text": gemma4,
}


def text_config(config: dict) -> dict:
    """A multimodal checkpoint's text model (Llava, Mistral 3, Gemma 3 4B+: the decoder's
    fields under text_config, which we serve on its own): its config, with the top level's
    fields (torch_dtype, quantization, tie_word_embeddings) as defaults. Others as they are."""
    text = config.get("text_config")
    if not isinstance(text, dict) or text.get("model_type") not in ARCHITECTURES:
        return config
    outer = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    outer.setdefault("tie_word_embeddings", False)  # transformers' default for these
    return {**outer, **text}


def text_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """A multimodal checkpoint's language-model tensors under the text model's own names:
    `language_model.` (transformers 4.x, mlx-lm) and `model.language_model.` (transformers
    5) prefixes become `model.`, the head stays; the vision tower and projector go."""
    out = {}
    for key, value in weights.items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("language_model."):
            key = key.removeprefix("language_model.")
        elif not key.startswith("lm_head."):
            continue  # vision_tower, multi_modal_projector, ...
        out[key] = value
    return out


def build_model(config: dict) -> nn.Module:
    """The architecture named by config.json's model_type, with random weights."""
    config = text_config(config)
    model_type = config.get("model_type")
    module = ARCHITECTURES.get(model_type)
    if module is None:
        text = config.get("text_config")
        inner = f", text model {text.get('model_type')!r}" if isinstance(text, dict) else ""
        raise ValueError(
            f"unsupported model_type {model_type!r}{inner} (supported: "
            f"{', '.join(ARCHITECTURES)}, and multimodal checkpoints of these)"
        )
    return module.Model(module.ModelArgs.from_dict(config))


def _patterns(keys: list[str], limit: int = 3) -> str:
    """Tensor names with layer and expert numbers as N: the shape of a layout, briefly."""
    numbered = (re.sub(r"\.\d+(?=\.)", ".N", k) for k in keys)
    seen = list(dict.fromkeys(numbered))
    more = f" and {len(seen) - limit} more" if len(seen) > limit else ""
    return ", ".join(repr(p) for p in seen[:limit]) + more


def load_weights(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    expected = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - expected)
    if missing or unexpected:
        layout = model.layout if isinstance(model, CausalLM) else "the model's"
        found = f"found {_patterns(unexpected)}" if unexpected else "found no tensor for them"
        raise CheckpointLayoutError(
            f"weights in {source} do not fit the {type(model).__module__.rsplit('.', 1)[-1]} "
            f"model: expected {layout} layout, missing {_patterns(missing)}; {found}"
        )
    params = dict(nn.utils.tree_flatten(model.parameters()))
    for key, value in weights.items():
        if value.shape != params[key].shape:
            raise CheckpointLayoutError(
                f"weight {key} in {source} has shape {value.shape}, expected {params[key].shape}"
                " (does config.json describe these weights?)"
            )
    model.load_weights(list(weights.items()), strict=True)


def names_this_module(model: nn.Module, weights: dict[str, mx.array]) -> bool:
    """Whether the tensors already carry the module's own names (what save_quantized
    writes): those need no sanitize, which would otherwise shift Gemma's norms twice."""
    own = {k for k, _ in nn.utils.tree_flatten(model.parameters())}
    return all(k in own or k.rsplit(".", 1)[0] + ".weight" in own for k in weights)


def cast(model: nn.Module, dtype: mx.Dtype) -> None:
    """Float parameters to dtype, except those whose names end with one of the model's
    `float32_parameters` (DeepSeek-V3's router bias: bfloat16 would round it, and with
    it which experts are chosen), which stay float32."""
    keep = tuple(getattr(model, "float32_parameters", ()))

    def convert(path: str, p: mx.array) -> mx.array:
        if not mx.issubdtype(p.dtype, mx.floating):
            return p
        return p.astype(mx.float32 if keep and path.endswith(keep) else dtype)

    model.update(tree_map_with_path(convert, model.parameters()))


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
            dequantize_model(model, mx_dtype)
            how = f"dequantized to {str(mx_dtype).removeprefix('mlx.core.')} at load"
    if cuda_qmv.enabled() and (adopted := cuda_qmv.adopt(model)):
        how += f"; {adopted} layers' decode products on our CUDA kernel"
    mx.eval(model.parameters())
    return mx_dtype, how


def load_hf_dir(path: Path, options: LoadOptions) -> LoadedModel:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    raw = read_config(path)
    config = text_config(raw)
    model = build_model(config)
    weights, mlx_written = read_safetensors(path)
    if not (mlx_written and names_this_module(model, weights)):
        if config is not raw:
            weights = text_weights(weights)
        # The Hub's, transformers 5's and mlx-lm's (mlx-community) names and layouts.
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
