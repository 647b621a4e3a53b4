"""Linear layers that read the same input joined into one product at load: Llama's q, k
and v projections, its MLP's gate and up, and a mixture of experts' gate and up (what a
module class names in JOINABLE; its forward reads either form).

A decode step then launches 4 products a layer instead of 7 (96 fewer launches a step for
Llama 3 8B), and the narrow k/v products (1,024 rows) ride in a 6,144-row one: on an H100
our 4-bit product took 0.0114 ms for each of them alone, and MLX's 0.007, against ~0.015
for 4,096 rows (benchmarks/logs/h100_qmm_rows_v14.log). In the engine (Llama 3 8B
shape, 4-bit, one stream, two A/B runs on an H100): 219.8 -> 275.1 and 210.8 -> 222.7
tok/s after 32 tokens, 180.6 -> 177.2 and 171.9 -> 174.3 after 8k (no change past
the noise). On by default on a GPU (Metal or CUDA), where a launch is what it saves; the CPU
keeps the parts, unmeasured there. NANOVLLM_FUSE_PROJECTIONS=0/1 decides instead.
Tensor-parallel engines never fuse: their shards split each projection by heads.
"""

from __future__ import annotations

import copy
import os

import mlx.core as mx
import mlx.nn as nn

# What a joined layer's parts must share beside their class (a quantized layer's format).
_FORMAT = ("group_size", "bits", "mode")


def enabled() -> bool:
    asked = os.environ.get("NANOVLLM_FUSE_PROJECTIONS")
    return mx.default_device() == mx.gpu if asked is None else asked == "1"


def join_linears(*layers: nn.Module) -> nn.Module | None:
    """One layer of the parts' class whose output is their outputs concatenated (each
    parameter joined along its output rows), or None where the parts differ in class,
    quantization, parameters, dtypes or input width (a mixed-precision checkpoint's q in
    4 bits beside v in 8). Outputs are axis 0 of every parameter, or the class's
    JOIN_AXIS (experts' layers: [experts, out, ...])."""
    first = layers[0]
    axis = getattr(type(first), "JOIN_AXIS", 0)
    kinds = {type(layer) for layer in layers}
    formats = {tuple(getattr(layer, name, None) for name in _FORMAT) for layer in layers}
    keys = {tuple(sorted(layer.keys())) for layer in layers}
    if len(kinds) > 1 or len(formats) > 1 or len(keys) > 1:
        return None
    params = {}
    for key in first.keys():
        parts = [layer[key] for layer in layers]
        if not all(isinstance(p, mx.array) for p in parts):
            return None
        others = {p.shape[:axis] + p.shape[axis + 1 :] for p in parts}
        if len({p.dtype for p in parts}) > 1 or len(others) > 1:
            return None
        params[key] = mx.concatenate(parts, axis=axis)
    joined = copy.copy(first)
    joined.update(params)
    return joined


def fuse_projections(model: nn.Module) -> int:
    """Join the projections every module's class names in JOINABLE, where the parts
    match; returns how many were joined. Evaluated one join at a time, so the transient
    is one join's parts, not the model's."""
    count = 0
    for _, module in list(model.named_modules()):  # joining replaces children
        for name, part_names in getattr(type(module), "JOINABLE", {}).items():
            joined = join_linears(*(module[part] for part in part_names))
            if joined is None:
                continue
            module[name] = joined
            for part in part_names:
                del module[part]
            mx.eval(joined.parameters())
            count += 1
    # The parts' buffers would otherwise stay in MLX's buffer cache, held, not freed.
    mx.clear_cache()
    return count
