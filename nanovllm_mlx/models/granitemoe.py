"""Granite MoE (IBM Granite 3.x "a400m"/"a800m") in MLX: the Llama decoder with a sparse
mixture of SwiGLU experts, and Granite's four multipliers (embeddings, the attention
scale, each residual branch, the logits' divisor). Its router takes the top k logits and
a softmax over them: the same weights as models/switch.py's renormalized top k."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.models import llama, mixtral


@dataclass(slots=True)
class ModelArgs(mixtral.ModelArgs):
    model_type: str = "granitemoe"
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0  # the softmax scale, in place of head_dim ** -0.5
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it


class DecoderLayer(llama.DecoderLayer):
    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        m = self.residual_multiplier
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, meta) * m
        return x + self.mlp(self.post_attention_layernorm(x)) * m


class Model(mixtral.Model):
    layout = (
        "the Hub's 'model.layers.N.block_sparse_moe.input_linear.weight' or mlx-community's "
        "'model.layers.N.block_sparse_moe.switch_mlp.gate_proj.weight'"
    )
    layer_class = DecoderLayer

    def attention(self, window: int | None) -> llama.Attention:
        attn = super().attention(window)
        attn.scale = self.args.attention_multiplier
        return attn

    def make_layer(self, index: int, window: int | None) -> llama.DecoderLayer:
        layer = super().make_layer(index, window)
        layer.residual_multiplier = self.args.residual_multiplier
        return layer

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.embed_tokens(input_ids) * self.args.embedding_multiplier

    def logits(self, hidden: mx.array) -> mx.array:
        return super().logits(hidden) / self.args.logits_scaling

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub layout (block_sparse_moe.input_linear [E, 2F, D] with gate then up,
        output_linear, router.layer), transformers 5's names or mlx-lm's (switch_mlp,
        read by mixtral's sanitize) -> ours."""
        out = {}
        for key, value in weights.items():
            key = key.replace(".block_sparse_moe.", ".mlp.")
            # Hub: router.layer.weight; transformers 5: router.weight; either quantized by
            # mlx-lm (.scales, .biases).
            key = key.replace(".mlp.router.layer.", ".mlp.gate.")
            key = key.replace(".mlp.router.", ".mlp.gate.")
            if key.endswith(".mlp.input_linear.weight"):
                key = key.replace(".mlp.input_linear.weight", ".mlp.experts.gate_up_proj")
            elif key.endswith(".mlp.output_linear.weight"):
                key = key.replace(".mlp.output_linear.weight", ".mlp.experts.down_proj")
            out[key] = value
        return super().sanitize(out)
