"""gpt-oss (OpenAI's open-weight MoE) in MLX, reading and writing a paged KV cache.

Llama's decoder with four differences: attention sinks (a learned logit per query head in
every softmax's denominator, so a head may attend to nothing), sliding-window (128) and
full layers alternating, biased q/k/v/o, and a mixture of biased experts whose SwiGLU is
clamped (gate at most `limit`, up within +-limit, (up + 1) * gate * sigmoid(alpha * gate)),
routed by a biased router whose top-k logits are softmaxed. The rotation is YaRN.

Checkpoints come as OpenAI's Hub layout (experts in MXFP4: `*_blocks` of packed 4-bit
floats and `*_scales` of power-of-two exponents, gate and up interleaved row by row), as
transformers 5 saves them dequantized (fused, [in, out]), or as mlx-community saves them
(mlx-lm's names, already split). MXFP4 experts stay in MLX's `mxfp4` quantized mode, whose
packing is the Hub's bit for bit, so they load without dequantizing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.models import llama
from nanovllm_mlx.models.switch import SwitchGLU, route

# transformers' GptOssConfig default when a config names no rope scaling.
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


@dataclass(slots=True)
class ModelArgs(llama.ModelArgs):
    model_type: str = "gpt_oss"
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    sliding_window: int | None = 128
    attention_bias: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        config = dict(config)
        # transformers' attribute_map (num_experts) and OpenAI's own name for k.
        for ours, alias in (
            ("num_local_experts", "num_experts"),
            ("num_experts_per_tok", "experts_per_token"),
        ):
            if config.get(ours) is None and config.get(alias) is not None:
                config[ours] = config[alias]
        if not config.get("rope_scaling") and not isinstance(config.get("rope_parameters"), dict):
            config["rope_scaling"] = DEFAULT_ROPE
        args = super(ModelArgs, cls).from_dict(config)
        assert isinstance(args, ModelArgs)
        if args.layer_types is None:  # transformers' default: sliding first, alternating
            args.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(args.num_hidden_layers)
            ]
        if len(args.layer_types) != args.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(args.layer_types)} entries for "
                f"{args.num_hidden_layers} layers"
            )
        if not 0 < args.num_experts_per_tok <= args.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok {args.num_experts_per_tok} must be in "
                f"[1, num_local_experts {args.num_local_experts}]"
            )
        return args


def clamped_swiglu(gate: mx.array, up: mx.array, alpha: float, limit: float) -> mx.array:
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


class Attention(llama.Attention):
    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sinks = mx.zeros((self.n_heads,))

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        q, k, v = self.project(x)
        q, k = self.rope(q, positions), self.rope(k, positions)
        out = paged_attention(q, k, v, cache, meta, self.scale, self.window, self.sinks)
        return self.o_proj(out)


class MoE(nn.Module):
    """A biased router over biased experts; each token through its top k, weighted by a
    softmax over those k logits."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.num_experts_per_tok
        self.router = nn.Linear(args.hidden_size, args.num_local_experts, bias=True)
        activation = partial(clamped_swiglu, alpha=args.swiglu_alpha, limit=args.swiglu_limit)
        self.experts = SwitchGLU(
            args.hidden_size,
            args.intermediate_size,
            args.num_local_experts,
            bias=True,
            activation=activation,
        )

    def __call__(self, x: mx.array) -> mx.array:
        # Softmax over all experts then the top k renormalized equals the top k's softmax.
        indices, weights = route(self.router(x), self.k, normalize=True)
        y = self.experts(x, mx.stop_gradient(indices))
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def _mxfp4_weight(blocks: mx.array) -> mx.array:
    """[..., out, in / 32, 16] bytes (two 4-bit codes each, low nibble first) -> MLX's
    packing, [..., out, in / 8] uint32: the same bits, read four bytes at a time."""
    return blocks.view(mx.uint32).flatten(-2)


def _split_gate_up(value: mx.array, axis: int) -> tuple[mx.array, mx.array]:
    """gpt-oss interleaves gate and up: even rows/columns gate, odd ones up."""
    gate = mx.take(value, mx.arange(0, value.shape[axis], 2), axis=axis)
    up = mx.take(value, mx.arange(1, value.shape[axis], 2), axis=axis)
    return gate, up


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.spec = replace(self.spec, attention_sinks=True)

    def make_layer(self, index: int, window: int | None) -> llama.DecoderLayer:
        args = self.args
        assert isinstance(args, ModelArgs)
        attn = Attention(args, self.rope, self.attention_factor, window)
        return llama.DecoderLayer(args, attn, MoE(args))

    def shard(self, group: mx.distributed.Group) -> None:
        raise ValueError(
            "tensor parallelism is not implemented for gpt_oss (its experts and attention "
            "sinks are not split across ranks): run it with tensor_parallel_size 1"
        )

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """OpenAI's MXFP4 experts or transformers 5's fused float ones -> one array per
        projection, [experts, out, in] (weights) and [experts, out] (biases)."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            prefix, _, name = key.rpartition(".")
            if not prefix.endswith("mlp.experts"):
                out[key] = value
                continue
            if name in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj"):
                if name == "gate_up_proj_blocks":
                    value, suffix = _mxfp4_weight(value), "weight"
                elif name == "gate_up_proj_scales":
                    suffix = "scales"
                else:  # transformers 5: [experts, in, 2 * hidden]
                    value, suffix = value.swapaxes(-1, -2), "weight"
                gate, up = _split_gate_up(value, axis=1)
                out[f"{prefix}.gate_proj.{suffix}"] = gate
                out[f"{prefix}.up_proj.{suffix}"] = up
            elif name == "gate_up_proj_bias":
                gate, up = _split_gate_up(value, axis=1)
                out[f"{prefix}.gate_proj.bias"], out[f"{prefix}.up_proj.bias"] = gate, up
            elif name == "down_proj_blocks":
                out[f"{prefix}.down_proj.weight"] = _mxfp4_weight(value)
            elif name == "down_proj_scales":
                out[f"{prefix}.down_proj.scales"] = value
            elif name == "down_proj_bias":
                out[f"{prefix}.down_proj.bias"] = value
            elif name == "down_proj":  # transformers 5: [experts, hidden, out]
                out[f"{prefix}.down_proj.weight"] = value.swapaxes(-1, -2)
            else:  # already split (mlx-lm's names)
                out[key] = value
        return super().sanitize(out)
