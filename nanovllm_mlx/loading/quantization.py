"""Quantized layers: quantizing a float model, building the layers a quantized checkpoint
fills, and dequantizing for backends whose quantized kernels are slow (the loader's
tools; loading/quantize.py saves a quantized copy)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.models.switch import QuantizedSwitchLinear, SwitchLinear


def quantizable(group_size: int):
    """nn.quantize predicate: layers whose input width splits into whole groups; the rest
    (a 50257-row embedding is fine, a 100-wide projection at group 64 is not) stay float."""

    def predicate(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    return predicate


def quantize_model(model: nn.Module, bits: int, group_size: int) -> None:
    """Quantize a float model in place for MLX's quantized matmul / embedding."""
    predicate = quantizable(group_size)
    if not any(predicate(p, m) for p, m in model.named_modules()):
        raise ValueError(
            f"no layer of this model has an input width divisible by quantize_group_size "
            f"{group_size}: nothing to quantize"
        )
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)


# MLX's quantization modes other than affine store no biases, and each has one (group
# size, bits): the shapes of a layer's weight and scales name its mode.
FLOAT_MODES = {(32, 4): "mxfp4", (16, 4): "nvfp4", (32, 8): "mxfp8"}


def quantize_like(model: nn.Module, weights: dict[str, mx.array], source: Path) -> None:
    """Turn the layers stored quantized in `weights` (a `.scales` entry) into quantized
    layers, with bits, group size and mode read off the tensors, so load_weights can fill
    them.

    One rule covers GGUF (group 32; Q8_0 embeddings next to Q4_1 matrices) and MLX
    checkpoints, whose config "quantization" entry may also vary per layer (mlx-lm gives
    MoE routers 8 bits next to 4-bit experts) and whose mode may be affine (with
    `.biases`) or mxfp4 / nvfp4 / mxfp8 (uint8 scales, no biases)."""

    def params(path: str, module: nn.Module) -> dict | bool:
        scales = weights.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            return False
        in_dims = module.weight.shape[-1]
        packed = weights[f"{path}.weight"].shape[-1]
        if in_dims % scales.shape[-1] or (packed * 32) % in_dims:
            raise ValueError(f"quantized weight {path} in {source} does not fit the model")
        group_size, bits = in_dims // scales.shape[-1], packed * 32 // in_dims
        if f"{path}.biases" in weights:
            mode = "affine"
        elif (group_size, bits) in FLOAT_MODES and scales.dtype == mx.uint8:
            mode = FLOAT_MODES[group_size, bits]
        else:
            raise ValueError(
                f"quantized weight {path} in {source} has no biases but is not one of MLX's "
                f"float modes (group {group_size}, {bits} bits, scales {scales.dtype}): "
                "re-convert it with mlx_lm.convert"
            )
        return {"group_size": group_size, "bits": bits, "mode": mode}

    nn.quantize(model, class_predicate=params)


def dequantize_model(model: nn.Module, dtype: mx.Dtype) -> int:
    """Replace every quantized linear and embedding layer by its float equivalent in
    dtype, in place; returns how many quantized layers stay (experts: gpt-oss-20b's would
    take 84 GB in float32, so they keep MLX's gather_qmm).

    MLX's CPU kernel for quantized matmul is far slower than its float32 BLAS path: the
    default 4-bit model prefilled at ~15 tok/s on 2 cores quantized and ~13x faster with
    the same weights dequantized, with the same greedy tokens. Metal and CUDA keep the
    quantized kernels, which are the fast path there."""
    swaps = []
    for path, module in model.named_modules():
        kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
        if not isinstance(module, kinds):
            continue
        weight = mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        ).astype(dtype)
        layer: nn.Module
        if isinstance(module, QuantizedSwitchLinear):
            layer = SwitchLinear(
                weight.shape[2], weight.shape[1], weight.shape[0], bias="bias" in module
            )
            if "bias" in module:  # gpt-oss's experts
                layer.bias = module.bias.astype(dtype)
        elif isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*weight.shape)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias.astype(dtype)
        layer.weight = weight
        swaps.append((path, layer))
    model.update_modules(nn.utils.tree_unflatten(swaps))
    return sum(hasattr(m, "scales") for _, m in model.named_modules())
