"""Mixtral in MLX: the Mistral decoder with a sparse mixture of SwiGLU experts in place of
the MLP (softmax router, top-k renormalized), experts through models/switch.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx

from nanovllm_mlx.models import llama
from nanovllm_mlx.models.switch import SparseMoE, stack_experts, stacked_layouts

# Hub names of an expert's projections -> ours.
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(slots=True)
class ModelArgs(llama.ModelArgs):
    model_type: str = "mixtral"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    # MixtralConfig's attribute_map: num_experts is an alias of num_local_experts.
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}


class Model(llama.Model):
    layout = (
        "the Hub's 'model.layers.N.block_sparse_moe.experts.E.w1.weight', transformers 5's "
        "fused 'model.layers.N.mlp.experts.gate_up_proj' or mlx-community's "
        "'model.layers.N.block_sparse_moe.switch_mlp.gate_proj.weight'"
    )
    layer_class = llama.DecoderLayer

    def make_layer(self, index: int, window: int | None) -> llama.DecoderLayer:
        args = self.args
        assert isinstance(args, ModelArgs)
        moe = SparseMoE(
            args.hidden_size,
            args.intermediate_size,
            args.num_local_experts,
            args.num_experts_per_tok,
            normalize=True,
        )
        return self.layer_class(args, self.attention(window), moe)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub layout (block_sparse_moe, experts one by one as w1/w2/w3), transformers
        5's fused experts or mlx-lm's block_sparse_moe.switch_mlp (mlx-community) -> ours
        (mlp.experts.{gate,up,down}_proj, stacked)."""
        weights = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in weights.items()}
        weights = stacked_layouts(weights)
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp.experts"
            weights = stack_experts(weights, prefix, self.args.num_local_experts, _EXPERT_NAMES)
        return super().sanitize(weights)
