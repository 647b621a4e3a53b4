"""Gemma 3 (its text model) in MLX, reading and writing a paged KV cache.

Local (sliding-window) and global layers interleave, five to one by default, each kind with
its own rotary base; embeddings are scaled by sqrt(hidden); every sub-block is wrapped in
two RMSNorms (before and after) whose weights act as (1 + w); queries and keys get a
per-head RMSNorm; the MLP is GeGLU (tanh GELU); the head is tied to the embedding.
Norm weights are held here as 1 + w, the way GGUF files store them, so an HF checkpoint's
are shifted by one in sanitize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.models.base import CausalLM, ModelSpec, layer_windows
from nanovllm_mlx.models.rope import RotaryEmbedding, rope_inv_freq, rope_type


@dataclass(slots=True)
class ModelArgs:
    model_type: str = "gemma3_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262144
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling: dict | None = None  # global layers only
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        config = config.get("text_config") or config  # the multimodal checkpoint's config
        names = [f.name for f in fields(cls)]
        args = cls(**{k: config[k] for k in names if config.get(k) is not None})
        # transformers 5: {"full_attention": {...}, "sliding_attention": {...}}
        rope = config.get("rope_parameters") or {}
        if "full_attention" in rope:
            full, local = rope["full_attention"], rope.get("sliding_attention", {})
            args.rope_theta = float(full.get("rope_theta", args.rope_theta))
            kind = full.get("rope_type", full.get("type", "default"))
            args.rope_scaling = full if kind != "default" else None
            args.rope_local_base_freq = float(local.get("rope_theta", args.rope_local_base_freq))
        if args.attn_logit_softcapping is not None:
            raise ValueError("Gemma attention logit soft-capping is not supported")
        if args.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported Gemma 3 activation {args.hidden_activation!r}")
        if args.num_attention_heads % args.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {args.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {args.num_key_value_heads}"
            )
        rope_type(args.rope_scaling)
        if args.layer_types is None:
            args.layer_types = [
                "full_attention" if (i + 1) % args.sliding_window_pattern == 0 else
                "sliding_attention"
                for i in range(args.num_hidden_layers)
            ]  # fmt: skip
        return args


class RMSNorm(nn.Module):
    """Gemma's RMSNorm; `weight` is 1 + w (see the module docstring)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryEmbedding, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.window = window
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        self.rope = rope

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        t = x.shape[0]
        q = self.q_norm(self.q_proj(x).reshape(t, self.n_heads, 1, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(t, self.n_kv_heads, 1, self.head_dim))
        v = self.v_proj(x).reshape(t, self.n_kv_heads, self.head_dim)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale, self.window))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryEmbedding, window: int | None):
        super().__init__()
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps)
        self.self_attn = Attention(args, rope, window)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.mlp = MLP(args)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps)

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), positions, cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        windows = layer_windows(args.layer_types, args.sliding_window, args.max_position_embeddings)
        self.spec = ModelSpec(
            n_layers=args.num_hidden_layers,
            n_kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            context_length=args.max_position_embeddings,
            vocab_size=args.vocab_size,
            layer_windows=windows,
        )
        hd = args.head_dim
        global_freq, factor = rope_inv_freq(
            hd, args.rope_theta, args.rope_scaling, args.max_position_embeddings
        )
        if factor != 1.0:
            raise ValueError("Gemma 3 rope scaling with an attention factor is not supported")
        global_rope = RotaryEmbedding(hd, global_freq)
        local_rope = RotaryEmbedding(hd, rope_inv_freq(hd, args.rope_local_base_freq)[0])
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_scale = math.sqrt(args.hidden_size)
        self.layers = [
            DecoderLayer(args, global_rope if t == "full_attention" else local_rope, w)
            for t, w in zip(args.layer_types, windows)
        ]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> mx.array:
        x = self.embed_tokens(input_ids)
        # transformers rounds the scale to the weights' dtype first (25.25 in bfloat16).
        x = x * mx.array(self.embed_scale, dtype=x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, positions, cache, meta)
        return self.norm(x)

    def logits(self, hidden: mx.array) -> mx.array:
        logits = self.embed_tokens.as_linear(hidden)
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub names (text-only `model.`, or the multimodal checkpoint's language model)
        onto ours; norm weights w -> 1 + w (in float32, before any cast)."""
        out = {}
        for key, value in weights.items():
            for prefix in ("model.language_model.", "language_model.model.", "model."):
                if key.startswith(prefix):
                    key = key.removeprefix(prefix)
                    break
            if key.startswith(("vision_tower.", "multi_modal_projector.", "lm_head.")):
                continue  # the image tower, and a head tied to the embedding
            if key.endswith("norm.weight"):
                value = value.astype(mx.float32) + 1.0
            out[key] = value
        return out
