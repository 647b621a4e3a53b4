"""Mixture-of-experts layers: routers (top-k softmax; DeepSeek's sigmoid scores in groups,
group_route) and the experts' SwiGLU, every expert's weights
in one [experts, out, in] array run with MLX's gather matmuls (mx.gather_mm, and
mx.gather_qmm once quantized), so a step costs one matmul per projection whatever the
routing, not a loop over experts."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.errors import CheckpointLayoutError

# At this many (token, expert) pairs a step sorts them by expert first: gather_mm then
# reads each expert's weights once for a run of rows instead of once per row.
SORT_AT = 64


class SwitchLinear(nn.Module):
    """num_experts linear maps in_dims -> out_dims, each row through its chosen ones
    (bias: one [out] bias per expert, as gpt-oss has)."""

    # Every parameter is [experts, out, ...]: models/fusion.py joins outputs on axis 1.
    JOIN_AXIS: ClassVar[int] = 1

    def __init__(self, in_dims: int, out_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        bound = 1 / math.sqrt(in_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_experts, out_dims, in_dims))
        if bias:
            self.bias = mx.zeros((num_experts, out_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x [N, 1, 1, in] or [N, k, 1, in], indices [N, k] -> [N, k, 1, out]."""
        y = mx.gather_mm(
            x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        return _add_bias(self, y, indices)

    def to_quantized(
        self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_: object
    ) -> QuantizedSwitchLinear:
        """nn.quantize's hook: experts quantize like any other linear layer."""
        num_experts, out_dims, in_dims = self.weight.shape
        layer = QuantizedSwitchLinear(
            in_dims, out_dims, num_experts, group_size, bits, mode, bias="bias" in self
        )
        layer.weight, layer.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        if biases:
            layer.biases = biases[0]
        if "bias" in self:
            layer.bias = self.bias
        return layer


class QuantizedSwitchLinear(nn.Module):
    """Experts stored quantized: affine (packed weights, scales and biases) or one of MLX's
    float modes (mxfp4, nvfp4, mxfp8: packed weights and uint8 scales, no biases), as
    gpt-oss's MXFP4 experts are."""

    JOIN_AXIS: ClassVar[int] = 1  # as SwitchLinear's

    def __init__(
        self,
        in_dims: int,
        out_dims: int,
        num_experts: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
        bias: bool = False,
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(
            mx.zeros((num_experts, out_dims, in_dims)), group_size, bits, mode=mode
        )
        if biases:
            self.biases = biases[0]
        if bias:
            self.bias = mx.zeros((num_experts, out_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        return _add_bias(self, y, indices)


def _add_bias(layer: nn.Module, y: mx.array, indices: mx.array) -> mx.array:
    """y [N, k, 1, out] plus each row's expert's bias, if the layer has one."""
    if "bias" not in layer:
        return y
    return y + mx.expand_dims(layer["bias"][indices], -2).astype(y.dtype)


def silu_glu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class SwitchGLU(nn.Module):
    """The experts' down(act(gate(x), up(x))), weights [experts, out, in]; act is SwiGLU's
    silu(gate) * up unless given (gpt-oss clamps it). models/fusion.py may join gate and
    up into one gather product (each expert's rows side by side), as it joins a dense
    MLP's: one launch a layer fewer."""

    JOINABLE: ClassVar[dict[str, tuple[str, ...]]] = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        bias: bool = False,
        activation: Callable[[mx.array, mx.array], mx.array] = silu_glu,
    ):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden, num_experts, bias)
        self.up_proj = SwitchLinear(dim, hidden, num_experts, bias)
        self.down_proj = SwitchLinear(hidden, dim, num_experts, bias)
        self.activation = activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, D], indices [N, k] -> [N, k, D]: each token through each of its experts."""
        n, k = indices.shape
        order = None
        if n * k >= SORT_AT:
            flat = indices.flatten()
            order = mx.argsort(flat)
            # One row per (token, expert) pair, grouped by expert.
            x = x[order // k][:, None, None]
            idx = flat[order][:, None]
        else:
            x, idx = x[:, None, None], indices
        sort = order is not None
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x, idx, sort), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x, idx, sort), self.up_proj(x, idx, sort)
        h = self.activation(gate, up)
        y = self.down_proj(h, idx, sort).squeeze(-2)
        if order is None:
            return y
        inverse = mx.argsort(order)
        return y.squeeze(1)[inverse].reshape(n, k, -1)


def route(logits: mx.array, k: int, normalize: bool) -> tuple[mx.array, mx.array]:
    """Router logits [N, E] -> (expert indices [N, k], weights [N, k]): softmax over all
    experts in float32, the k largest, renormalized to sum to 1 if `normalize` (Mixtral
    always, Qwen3-MoE with norm_topk_prob). Top-k of the logits then a softmax over them,
    Granite's order, is the same thing."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]
    weights = mx.take_along_axis(probs, indices, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return indices, weights


def group_route(
    logits: mx.array,
    bias: mx.array,
    k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling: float,
) -> tuple[mx.array, mx.array]:
    """Router logits [N, E] (float32) -> (expert indices [N, k], weights [N, k]).

    Experts are chosen on sigmoid scores plus the load-balancing bias
    (e_score_correction_bias), among the topk_group groups whose two best biased scores
    sum highest; their weights are the unbiased scores, renormalized if `normalize`, times
    routed_scaling_factor (transformers' DeepseekV3TopkRouter)."""
    scores = mx.sigmoid(logits)
    choice = scores + bias
    if topk_group < n_group:
        n = choice.shape[0]
        grouped = choice.reshape(n, n_group, -1)
        group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)  # [N, G]
        dropped = mx.argpartition(group_scores, kth=n_group - topk_group - 1, axis=-1)
        dropped = dropped[:, : n_group - topk_group]
        keep = mx.put_along_axis(
            mx.ones(group_scores.shape, dtype=mx.bool_), dropped, mx.array(False), axis=-1
        )
        choice = mx.where(keep[..., None], grouped, -mx.inf).reshape(n, -1)
    indices = mx.argpartition(-choice, kth=k - 1, axis=-1)[:, :k]
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return indices, weights * scaling


class SparseMoE(nn.Module):
    """A router (`gate`) over num_experts SwiGLU experts, each token through its top k."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, normalize: bool):
        super().__init__()
        self.k, self.normalize = k, normalize
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = SwitchGLU(dim, hidden, num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = route(self.gate(x), self.k, self.normalize)
        y = self.experts(x, mx.stop_gradient(indices))
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def stack_experts(
    weights: dict[str, mx.array], prefix: str, num_experts: int, names: dict[str, str]
) -> dict[str, mx.array]:
    """Hub checkpoints store experts one by one ({prefix}.{e}.{name}.weight, and .scales /
    .biases where quantized that way); stack each projection into one [experts, out, in]
    array under {prefix}.{ours}. names: the checkpoint's projection names -> ours
    (gate_proj, up_proj, down_proj)."""
    out = dict(weights)
    for theirs, ours in names.items():
        for part in ("weight", "scales", "biases"):
            keys = [f"{prefix}.{e}.{theirs}.{part}" for e in range(num_experts)]
            if keys[0] not in out:
                continue
            missing = [key for key in keys if key not in out]
            if missing:
                raise CheckpointLayoutError(
                    f"expert tensor {missing[0]} is missing: the config declares {num_experts} "
                    f"experts and the checkpoint has fewer (is num_experts right?)"
                )
            out[f"{prefix}.{ours}.{part}"] = mx.stack([out.pop(key) for key in keys])
    return out


def stacked_layouts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The two stacked layouts -> ours ({prefix}.experts.{gate,up,down}_proj.weight):
    mlx-lm's (mlx-community repos: {prefix}.switch_mlp.gate_proj.weight / .scales /
    .biases, already [E, out, in]) and transformers 5's in-memory fused one
    ({prefix}.experts.gate_up_proj [E, 2F, D] and .down_proj [E, D, F], no .weight)."""
    out = {}
    for key, value in weights.items():
        key = key.replace(".switch_mlp.", ".experts.")
        if key.endswith(".experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            gate, up = mx.split(value, 2, axis=1)
            out[f"{prefix}.gate_proj.weight"], out[f"{prefix}.up_proj.weight"] = gate, up
        elif key.endswith(".experts.down_proj"):
            out[f"{key}.weight"] = value
        else:
            out[key] = value
    return out
