"""Llama (1/2/3), Mistral and Qwen2 in MLX, reading and writing a paged KV cache.

One decoder for the family: RMSNorm, rotary embeddings in the Hugging Face "rotate half"
layout, grouped-query attention and a SwiGLU MLP. Qwen2 differs only by biases on q/k/v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nanovllm_mlx.attention.paged import AttentionMetadata, KVCache, paged_attention

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


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
    use_sliding_window: bool = True
    # GGUF files of Llama 3.1+ carry their rescaled frequencies as divisors instead of the
    # rope_scaling parameters they were computed from (tensor rope_freqs.weight).
    rope_freq_factors: list[float] | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        args = cls(**{k: config[k] for k in cls.__slots__ if config.get(k) is not None})
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
    def context_length(self) -> int:
        # Within the window, sliding-window attention equals full attention; capping the
        # context there keeps every sequence inside it rather than attending too far.
        window = self.sliding_window if self.use_sliding_window else None
        if window and window < self.max_position_embeddings:
            return window
        return self.max_position_embeddings


def rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {ROPE_TYPES})")
    return kind


def rope_inv_freq(args: ModelArgs) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim / 2] and the attention factor, computed in float32 the
    way transformers' ROPE_INIT_FUNCTIONS do, so positions rotate identically."""
    dim, base = args.head_dim, args.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    scaling = args.rope_scaling or {}
    kind = rope_type(scaling)
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "dynamic":
        # Dynamic NTK only changes the base past max_position_embeddings, which is also
        # where the engine caps the context: inside it, this is the plain rotation.
        pass
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(args, pos_freqs)
    if args.rope_freq_factors is not None:
        factors = np.asarray(args.rope_freq_factors, dtype=np.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(
                f"rope_freq_factors has {factors.size} entries, expected {inv_freq.size}"
            )
        inv_freq = inv_freq / factors
    return inv_freq.astype(np.float32), float(attention_factor)


def _yarn(args: ModelArgs, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    scaling, dim, base = args.rope_scaling, args.head_dim, args.rope_theta
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or args.max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), attention_factor


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rope_freqs: mx.array, attention_factor: float):
        super().__init__()
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
        self._rope_freqs = rope_freqs  # underscore: not a parameter, never cast or loaded

    def _rope(self, x: mx.array, positions: mx.array) -> mx.array:
        # [T, H, 1, D] with one offset per "batch" row: every flat token gets its own
        # position, whatever sequence it belongs to.
        x = mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=positions,
            freqs=self._rope_freqs,
        )
        return x.squeeze(2)  # one op; x[:, :, 0, :] is a slice and a squeeze

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.n_heads, 1, self.head_dim)
        k = self.k_proj(x).reshape(t, self.n_kv_heads, 1, self.head_dim)
        v = self.v_proj(x).reshape(t, self.n_kv_heads, self.head_dim)
        q, k = self._rope(q, positions), self._rope(k, positions)
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rope_freqs: mx.array, attention_factor: float):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args, rope_freqs, attention_factor)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MLP(args)

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, attention_factor = rope_inv_freq(args)
        # mx.fast.rope takes periods (position / freq is the angle), not inverse frequencies.
        rope_freqs = mx.array(1.0 / inv_freq.astype(np.float64), dtype=mx.float32)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, rope_freqs, attention_factor) for _ in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    n_layers = property(lambda self: self.args.num_hidden_layers)
    n_kv_heads = property(lambda self: self.args.num_key_value_heads)
    head_dim = property(lambda self: self.args.head_dim)
    max_position_embeddings = property(lambda self: self.args.context_length)
    vocab_size = property(lambda self: self.args.vocab_size)

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        caches: list[KVCache],
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
