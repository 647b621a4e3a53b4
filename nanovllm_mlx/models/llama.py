"""Llama (1/2/3), Mistral and Qwen2 in MLX, reading and writing a paged KV cache.

One decoder for the family: RMSNorm, rotary embeddings in the Hugging Face "rotate half"
layout, grouped-query attention and a SwiGLU MLP. Qwen2 differs only by biases on q/k/v.
Architectures built on this decoder (qwen3.py, mixtral.py, qwen3_moe.py) subclass its
ModelArgs and Attention and override Model.make_layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.models.base import CausalLM, ModelSpec, check_divides, layer_windows
from nanovllm_mlx.models.rope import RotaryEmbedding, rope_inv_freq, rope_type


@dataclass(slots=True)
class ModelArgs:
    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    use_sliding_window: bool | None = None  # None: Mistral slides, Qwen2 does not
    max_window_layers: int = 0
    layer_types: list[str] | None = None
    # GGUF files of Llama 3.1+ carry their rescaled frequencies as divisors instead of the
    # rope_scaling parameters they were computed from (tensor rope_freqs.weight).
    rope_freq_factors: list[float] | None = field(default=None, repr=False)
    # Our field -> the name a config may hold it under instead: the aliases transformers'
    # config classes declare (attribute_map), whose save_pretrained writes the other one.
    aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        values = {}
        for f in fields(cls):
            key = f.name if config.get(f.name) is not None else cls.aliases.get(f.name)
            if key is not None and config.get(key) is not None:
                values[f.name] = config[key]
        args = cls(**values)
        # transformers 5 writes rope_parameters (theta and scaling in one dict) instead of
        # the top-level rope_theta + rope_scaling of 4.x configs; accept both.
        rope = config.get("rope_parameters")
        if isinstance(rope, dict):
            args.rope_theta = float(rope.get("rope_theta", args.rope_theta))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                args.rope_scaling = rope
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        if args.head_dim is None:
            if args.hidden_size % args.num_attention_heads:
                raise ValueError(
                    f"hidden_size {args.hidden_size} is not divisible by "
                    f"num_attention_heads {args.num_attention_heads}"
                )
            args.head_dim = args.hidden_size // args.num_attention_heads
        if args.num_attention_heads % args.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {args.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {args.num_key_value_heads}"
            )
        if args.hidden_act != "silu":
            raise ValueError(f"unsupported {args.model_type} activation {args.hidden_act!r}")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        rope_type(args.rope_scaling)  # fail at load time, not at the first step
        return args

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """transformers' rule: Mistral, Mixtral and Phi-3 slide on every layer when they have a
        window; the Qwens only with use_sliding_window, from layer max_window_layers on."""
        types = self.layer_types
        every_layer = self.model_type in ("mistral", "mixtral", "phi3")
        sliding = self.use_sliding_window
        if sliding is None:
            sliding = every_layer
        if types is None and sliding and self.sliding_window:
            first = 0 if every_layer else self.max_window_layers
            types = [
                "sliding_attention" if i >= first else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        return layer_windows(types, self.sliding_window, self.max_position_embeddings)


class Attention(nn.Module):
    # What models/fusion.py may join at load (project() reads either form).
    JOINABLE: ClassVar[dict[str, tuple[str, ...]]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(
        self,
        args: ModelArgs,
        rope: RotaryEmbedding,
        attention_factor: float,
        window: int | None = None,
    ):
        super().__init__()
        self.window = window
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        # YaRN scales cos and sin, so q.k by its square: fold that into the softmax scale.
        self.scale = hd**-0.5 * attention_factor**2
        bias = args.qkv_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=args.attention_bias)
        self.rope = rope

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        q, k, v = self.project(x)
        q, k = self.norm_qk(q, k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale, self.window))

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q [T, H, 1, D], k [T, Hkv, 1, D] and v [T, Hkv, D] of x [T, hidden]: one
        product where models/fusion.py joined the three (JOINABLE)."""
        t, hd = x.shape[0], self.head_dim
        n_q, n_kv = self.n_heads * hd, self.n_kv_heads * hd
        if "qkv_proj" in self:
            qkv = self.qkv_proj(x)
            q, k, v = qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], qkv[:, n_q + n_kv :]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.reshape(t, self.n_heads, 1, hd), k.reshape(t, self.n_kv_heads, 1, hd)
        return q, k, v.reshape(t, self.n_kv_heads, hd)

    def norm_qk(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        """[T, H, 1, D] queries and keys before the rotation; Qwen3 normalizes them."""
        return q, k


class MLP(nn.Module):
    JOINABLE: ClassVar[dict[str, tuple[str, ...]]] = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, args: ModelArgs, hidden: int | None = None):
        super().__init__()
        dim, bias = args.hidden_size, args.mlp_bias
        hidden = hidden or args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = mlp

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        windows = args.layer_windows or (None,) * args.num_hidden_layers
        self.spec = ModelSpec(
            n_layers=args.num_hidden_layers,
            n_kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            context_length=args.max_position_embeddings,
            vocab_size=args.vocab_size,
            layer_windows=windows,
        )
        # Not parameters: plain attributes, which loading and casting never touch.
        self.rope, self.attention_factor = self.make_rope(args)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [self.make_layer(i, w) for i, w in enumerate(windows)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def make_rope(self, args: ModelArgs) -> tuple[RotaryEmbedding, float]:
        """The rotation every layer shares, and its attention factor (YaRN's mscale)."""
        inv_freq, attention_factor = rope_inv_freq(
            args.head_dim,
            args.rope_theta,
            args.rope_scaling,
            args.max_position_embeddings,
            args.rope_freq_factors,
        )
        return RotaryEmbedding(args.head_dim, inv_freq), attention_factor

    def make_layer(self, index: int, window: int | None) -> DecoderLayer:
        """Layer `index`, attending over `window` keys (None: all); subclasses swap in
        their attention and MLP."""
        return DecoderLayer(self.args, self.attention(window), MLP(self.args))

    def attention(self, window: int | None) -> Attention:
        return Attention(self.args, self.rope, self.attention_factor, window)

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> mx.array:
        x = self.embed(input_ids)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, positions, cache, meta)
        return self.norm(x)

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def shard(self, group: mx.distributed.Group) -> None:
        n, args = group.size(), self.args
        check_divides(
            n,
            attention_heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            intermediate_size=args.intermediate_size,
        )
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not (isinstance(attn, Attention) and type(mlp) is MLP):
                # Fused projections (Phi-3) and experts (Mixtral, Qwen3-MoE) split otherwise.
                raise ValueError(
                    f"tensor parallelism is not implemented for {type(self).__module__}'s "
                    f"{type(attn).__name__} / {type(mlp).__name__} layers: run it with "
                    "tensor_parallel_size 1"
                )
            # Query and KV heads split alike, so each rank's query heads keep their group's
            # KV heads (GQA).
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(
                    attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group)
                )
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.n_heads //= n
            attn.n_kv_heads //= n
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        self.spec = replace(self.spec, n_kv_heads=self.spec.n_kv_heads // n)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub names (`model.` prefix) onto this module's; drop buffers and a tied head."""
        out = {}
        for key, value in weights.items():
            key = key.removeprefix("model.")
            if "rotary_emb.inv_freq" in key:
                continue  # a buffer some old checkpoints saved; recomputed from the config
            if self.args.tie_word_embeddings and key.startswith("lm_head."):
                continue  # some checkpoints save the tied head anyway
            out[key] = value
        return out
