"""Phi-3 and Phi-4-mini in MLX: the Llama decoder with fused projections (qkv_proj,
gate_up_proj), partial rotary embeddings (Phi-4-mini rotates 3/4 of each head) and
LongRoPE scaling ("su"/"longrope": per-frequency short and long factors).

LongRoPE: transformers rotates with the short factors while a sequence is at most
original_max_position_embeddings long and with the long ones past it. Here each token is
rotated by its own position: short below that length, long from it on. That is
transformers' result for every sequence that fits the original context and for decode
steps past it; a prompt longer than it in one piece gets the long factors only on its
tail here (transformers re-rotates the whole prompt), as a paged cache cannot re-rotate
the keys it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.models import llama
from nanovllm_mlx.models.rope import RotaryEmbedding, rope_inv_freq


@dataclass(slots=True)
class ModelArgs(llama.ModelArgs):
    model_type: str = "phi3"
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    short_factor: list[float] | None = field(default=None, repr=False)
    long_factor: list[float] | None = field(default=None, repr=False)
    longrope_attention_factor: float = 1.0

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        skip = ("rope_scaling", "partial_rotary_factor")
        plain = {k: v for k, v in config.items() if k not in skip}
        if kind in ("longrope", "su"):
            plain.pop("rope_parameters", None)
            plain["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        args = llama.ModelArgs.from_dict.__func__(cls, plain)
        args.partial_rotary_factor = float(
            config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        )
        if kind in ("longrope", "su"):
            args.short_factor, args.long_factor = rope["short_factor"], rope["long_factor"]
            original = rope.get("original_max_position_embeddings")
            original = original or args.original_max_position_embeddings
            args.original_max_position_embeddings = original
            factor = rope.get("factor") or args.max_position_embeddings / original
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = (
                    1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
                )
            args.longrope_attention_factor = float(attention_factor)
        elif kind != "default":
            args.rope_scaling = rope
        return args

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class LongRoPE:
    """Two rotations, short below the original context, long from it on (see above)."""

    def __init__(self, args: ModelArgs):
        dims = args.rotary_dims
        base = rope_inv_freq(dims, args.rope_theta)[0]
        self.original = args.original_max_position_embeddings
        self.short = RotaryEmbedding(dims, base / np.asarray(args.short_factor, np.float32))
        self.long = RotaryEmbedding(dims, base / np.asarray(args.long_factor, np.float32))

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        short, long = self.short(x, positions), self.long(x, positions)
        return mx.where((positions >= self.original)[:, None, None], long, short)


class PartialScaled:
    """A partial rotation whose cos and sin carry an attention factor: only the rotated
    features are scaled (folding the factor into the softmax scale, as for a full
    rotation, would scale the pass-through features too)."""

    def __init__(self, rope: RotaryEmbedding | LongRoPE, dims: int, head_dim: int, factor: float):
        self.rope = rope
        self._mult = mx.array([factor] * dims + [1.0] * (head_dim - dims), dtype=mx.float32)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        y = self.rope(x, positions)
        return y * self._mult.astype(y.dtype)


class Attention(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        rope: RotaryEmbedding | LongRoPE,
        attention_factor: float,
        window: int | None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        # Scaled cos and sin scale q.k by the factor's square.
        self.scale = hd**-0.5 * attention_factor**2
        self.window = window
        self.qkv_proj = nn.Linear(
            args.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=False)
        self.rope = rope

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        t, hd = x.shape[0], self.head_dim
        q, k, v = mx.split(
            self.qkv_proj(x), [self.n_heads * hd, (self.n_heads + self.n_kv_heads) * hd], axis=-1
        )
        q = self.rope(q.reshape(t, self.n_heads, 1, hd), positions)
        k = self.rope(k.reshape(t, self.n_kv_heads, 1, hd), positions)
        v = v.reshape(t, self.n_kv_heads, hd)
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale, self.window))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class Model(llama.Model):
    def make_rope(self, args: llama.ModelArgs) -> tuple[RotaryEmbedding | LongRoPE, float]:
        assert isinstance(args, ModelArgs)
        if args.short_factor is not None:
            rope, factor = LongRoPE(args), args.longrope_attention_factor
        else:
            freq, factor = rope_inv_freq(
                args.rotary_dims, args.rope_theta, args.rope_scaling, args.max_position_embeddings
            )
            rope = RotaryEmbedding(args.rotary_dims, freq)
        if factor != 1.0 and args.rotary_dims < args.head_dim:
            return PartialScaled(rope, args.rotary_dims, args.head_dim, factor), 1.0
        return rope, factor

    def make_layer(self, index: int, window: int | None) -> llama.DecoderLayer:
        attn = Attention(self.args, self.rope, self.attention_factor, window)
        return llama.DecoderLayer(self.args, attn, MLP(self.args))
