"""Qwen3.5 (dense and MoE) and Qwen3-Next in MLX: hybrid linear attention.

Three of every four layers (layer_types) mix tokens with Gated DeltaNet (gated_delta.py),
whose per-sequence state lives in the engine's state pool; the others are full attention
over the paged KV cache, with per-head q/k RMSNorm, rotary embeddings on the first
partial_rotary_factor of each head, and an output gate (q_proj also yields a sigmoid gate
per query feature). Norms are Gemma-style, (1 + w): sanitize folds the 1 into the weights,
as mlx-lm stores them. The MoE variants route top-k experts and add a shared expert
scaled by a sigmoid gate. Multimodal checkpoints (qwen3_5, qwen3_5_moe) load their text
model only (text_config, `model.language_model.` weights). Qwen3-Next differs in its
config and in fused q/k/v/z and b/a projections, which sanitize splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.attention.state import StateCache
from nanovllm_mlx.models.base import CausalLM, ModelSpec
from nanovllm_mlx.models.gated_delta import GatedDeltaNet, split_qwen3_next
from nanovllm_mlx.models.rope import RotaryEmbedding, rope_inv_freq
from nanovllm_mlx.models.switch import SparseMoE, stack_experts, stacked_layouts

MOE_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
_EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_FOLDED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                 "k_norm.weight")  # fmt: skip


@dataclass(slots=True)
class ModelArgs:
    model_type: str = "qwen3_5_text"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    intermediate_size: int = 12288
    vocab_size: int = 248320
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        # The multimodal checkpoints keep the language model's settings in text_config.
        text = dict(config.get("text_config") or {})
        outer = {k: v for k, v in config.items() if k != "text_config"}
        merged = {**outer, **text} if text else outer
        merged["model_type"] = config.get("model_type", "qwen3_5_text")
        names = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in merged.items() if k in names and v is not None})
        rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}
        args.rope_theta = float(rope.get("rope_theta", merged.get("rope_theta", args.rope_theta)))
        args.partial_rotary_factor = float(
            rope.get("partial_rotary_factor", merged.get("partial_rotary_factor", 0.25))
        )
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"unsupported {args.model_type} rope_type {kind!r}")
        if not args.layer_types:
            every = args.full_attention_interval
            args.layer_types = [
                "full_attention" if (i + 1) % every == 0 else "linear_attention"
                for i in range(args.num_hidden_layers)
            ]
        args.validate()
        return args

    def validate(self) -> None:
        unknown = set(self.layer_types) - {"linear_attention", "full_attention"}
        if unknown or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"{self.model_type} layer_types must name linear_attention or "
                f"full_attention for each of the {self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported {self.model_type} activation {self.hidden_act!r}")
        if self.linear_conv_kernel_dim < 2:
            raise ValueError(
                f"linear_conv_kernel_dim must be >= 2, got {self.linear_conv_kernel_dim}"
            )
        if self.is_moe and self.num_experts < 1:
            raise ValueError(f"{self.model_type} needs num_experts >= 1")

    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_TYPES

    def is_sparse(self, layer: int) -> bool:
        if self.model_type != "qwen3_next":
            return self.is_moe  # Qwen3.5-MoE: every layer
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SharedExpertMoE(SparseMoE):
    """Routed experts plus one shared expert, scaled by a sigmoid gate per token."""

    def __init__(self, args: ModelArgs):
        normalize = args.norm_topk_prob or args.model_type != "qwen3_next"
        super().__init__(
            args.hidden_size,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            normalize=normalize,
        )
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().__call__(x) + shared


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryEmbedding):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, 2 * self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = rope

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        t, hd = x.shape[0], self.head_dim
        q, gate = mx.split(self.q_proj(x).reshape(t, self.n_heads, 2 * hd), 2, axis=-1)
        q = self.q_norm(q)[:, :, None]
        k = self.k_norm(self.k_proj(x).reshape(t, self.n_kv_heads, hd))[:, :, None]
        v = self.v_proj(x).reshape(t, self.n_kv_heads, hd)
        q, k = self.rope(q, positions), self.rope(k, positions)
        out = paged_attention(q, k, v, cache, meta, hd**-0.5)
        return self.o_proj(out * mx.sigmoid(gate.reshape(t, -1)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int, rope: RotaryEmbedding):
        super().__init__()
        self.linear = args.layer_types[index] == "linear_attention"
        if self.linear:
            self.linear_attn = GatedDeltaNet(
                args.hidden_size,
                args.linear_num_key_heads,
                args.linear_num_value_heads,
                args.linear_key_head_dim,
                args.linear_value_head_dim,
                args.linear_conv_kernel_dim,
                args.rms_norm_eps,
            )
        else:
            self.self_attn = Attention(args, rope)
        self.mlp: nn.Module
        if args.is_sparse(index):
            self.mlp = SharedExpertMoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        positions: mx.array,
        cache: KVCache | StateCache,
        meta: AttentionMetadata,
    ) -> mx.array:
        h = self.input_layernorm(x)
        if isinstance(cache, StateCache):
            h = self.linear_attn(h, cache, meta.states)
        else:
            h = self.self_attn(h, positions, cache, meta)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, _ = rope_inv_freq(
            args.rotary_dim, args.rope_theta, None, args.max_position_embeddings
        )
        rope = RotaryEmbedding(args.rotary_dim, inv_freq)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, rope) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        linear = tuple(i for i, layer in enumerate(self.layers) if layer.linear)
        self.spec = ModelSpec(
            n_layers=args.num_hidden_layers,
            n_kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            context_length=args.max_position_embeddings,
            vocab_size=args.vocab_size,
            state_layers=linear,
            state_shapes=self.layers[linear[0]].linear_attn.state_shapes() if linear else None,
        )

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        caches: list[Any],
        meta: AttentionMetadata,
    ) -> mx.array:
        x = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, positions, cache, meta)
        return self.norm(x)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def shard(self, group: mx.distributed.Group) -> None:
        # The heads split as Qwen3's would, but the state pool, its snapshots and the
        # fused conv channels are not sharded yet: refuse before anything is split.
        raise ValueError(
            f"tensor parallelism is not implemented for {self.args.model_type} (hybrid "
            "linear attention): run it with tensor_parallel_size 1"
        )

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub, transformers 5, mlx-lm and multimodal names onto ours: the text model only
        (no vision tower, no multi-token-prediction head), experts stacked, Qwen3-Next's
        fused projections split, the conv weight in MLX's layout and the (1 + w) norms
        folded (a checkpoint whose conv is in MLX's layout has them folded already)."""
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            for old, new in (("model.language_model.", "model."), ("language_model.", "")):
                if key.startswith(old):
                    key = new + key.removeprefix(old)
            if key.startswith(("mtp.", "model.visual.", "visual.", "vision_tower.")):
                continue
            if self.args.tie_word_embeddings and key.startswith("lm_head."):
                continue
            out[key.removeprefix("model.")] = value
        out = stacked_layouts(out)
        for i in range(self.args.num_hidden_layers):
            prefix = f"layers.{i}.mlp.experts"
            if self.args.is_sparse(i):
                out = stack_experts(out, prefix, self.args.num_experts, _EXPERT_NAMES)
            a = self.args
            out = split_qwen3_next(
                out,
                f"layers.{i}.linear_attn",
                a.linear_num_key_heads,
                a.linear_key_head_dim,
                a.linear_value_head_dim,
                a.linear_num_value_heads,
            )
        hub_layout = any(k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in out.items())
        for key, value in out.items():
            if key.endswith("conv1d.weight") and value.shape[-1] != 1:
                out[key] = value.moveaxis(2, 1)
            elif hub_layout and (key == "norm.weight" or key.endswith(_FOLDED_NORMS)):
                out[key] = value + 1.0
        return out
