"""Qwen3-MoE in MLX: Qwen3's attention (per-head q/k RMSNorm) with a sparse mixture of
SwiGLU experts (softmax router, top-k renormalized when norm_topk_prob) on the layers
decoder_sparse_step and mlp_only_layers select; dense SwiGLU on the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import mlx.core as mx

from nanovllm_mlx.models import llama, qwen3
from nanovllm_mlx.models.switch import SparseMoE, stack_experts, stacked_layouts

_EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


@dataclass(slots=True)
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen3_moe"
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # transformers 5's Qwen3MoeConfig saves num_local_experts (num_experts is its alias).
    aliases: ClassVar[dict[str, str]] = {"num_experts": "num_local_experts"}

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


class Model(qwen3.Model):
    layout = (
        "the Hub's 'model.layers.N.mlp.experts.E.gate_proj.weight', transformers 5's fused "
        "'model.layers.N.mlp.experts.gate_up_proj' or mlx-community's "
        "'model.layers.N.mlp.switch_mlp.gate_proj.weight'"
    )

    def make_layer(self, index: int, window: int | None) -> llama.DecoderLayer:
        args = self.args
        assert isinstance(args, ModelArgs)
        if not args.is_sparse(index):
            return llama.DecoderLayer(args, self.attention(window), llama.MLP(args))
        moe = SparseMoE(
            args.hidden_size,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            normalize=args.norm_topk_prob,
        )
        return llama.DecoderLayer(args, self.attention(window), moe)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Experts one by one (the Hub layout), fused (transformers 5) or stacked as
        mlx-lm's switch_mlp (mlx-community) -> ours, stacked."""
        weights = stacked_layouts(weights)
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp.experts"
            weights = stack_experts(weights, prefix, self.args.num_experts, _EXPERT_NAMES)
        return super().sanitize(weights)
