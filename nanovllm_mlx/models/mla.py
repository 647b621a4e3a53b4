"""Multi-head latent attention (DeepSeek-V2/V3) over a latent paged cache.

Each token's keys and values are compressed to one latent c_kv (kv_lora_rank numbers,
RMS-normalized) plus one rope key k_pe shared by all heads (qk_rope_head_dim); kv_b_proj
expands the latent into every head's no-rope key and value. The cache keeps only
[c_kv, k_pe] per token: DeepSeek-V3's 512 + 64 = 576 numbers a layer where the expanded
K/V would be 128 heads x (192 + 128) = 40,960, 71x less.

Attention runs on the latent without expanding it. A head's score is
q_nope . (W_k c) + q_pe . k_pe = (W_k^T q_nope) . c + q_pe . k_pe, so the query is
absorbed through kv_b_proj's key part (embed_q) into [W_k^T q_nope, q_pe]; that is
multi-query attention with one KV "head" of dim 576 against the cached [c, k_pe], whose
values are the latent c itself (KVCache.value_dim, no V pool), and each head's output
o = sum p c is expanded afterwards through kv_b_proj's value part (unembed_out).

The parameters embed_q [H, kv_lora_rank, qk_nope] and unembed_out [H, v_head, kv_lora_rank]
are kv_b_proj split by `split_kv_b_proj`, named and shaped as mlx-lm names them, so an
mlx-lm-converted checkpoint's attention loads as it is.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.models.rope import RotaryEmbedding

# DeepSeek's q_a_layernorm and kv_a_layernorm keep the RMSNorm default, whatever the
# config's rms_norm_eps (transformers and the reference code alike).
LATENT_NORM_EPS = 1e-6


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    """1/sqrt(qk_head_dim), times mscale_all_dim's YaRN mscale squared when the rope is
    scaled (transformers' yarn_apply_mscale): this scales the no-rope dims too, which the
    rotation's own attention factor does not reach. DeepSeek-V3 (factor 40, mscale_all_dim
    1) gets 1.3689^2 = 1.874x."""
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = yarn_mscale(rope_scaling["factor"], mscale_all_dim)
            scale *= m * m
    return scale


class MultiLinear(nn.Module):
    """One linear map per head: x [T, H, in] -> [T, H, out], weight [H, out, in]."""

    def __init__(self, in_dims: int, out_dims: int, num_heads: int):
        super().__init__()
        bound = 1 / math.sqrt(in_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_heads, out_dims, in_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = x.swapaxes(0, 1) @ self.weight.swapaxes(-1, -2)  # [H, T, out], batched per head
        return y.swapaxes(0, 1)

    def to_quantized(
        self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_: object
    ) -> QuantizedMultiLinear:
        """nn.quantize's hook (and the loader's, for mlx-community checkpoints, which store
        embed_q and unembed_out quantized)."""
        num_heads, out_dims, in_dims = self.weight.shape
        layer = QuantizedMultiLinear(in_dims, out_dims, num_heads, group_size, bits, mode)
        layer.weight, layer.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        if biases:
            layer.biases = biases[0]
        return layer


class QuantizedMultiLinear(nn.Module):
    """MultiLinear with quantized weights (affine: scales and biases; MLX's float modes:
    scales alone), through mx.quantized_matmul batched over the heads."""

    def __init__(
        self,
        in_dims: int,
        out_dims: int,
        num_heads: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        packed = mx.quantize(mx.zeros((num_heads, out_dims, in_dims)), group_size, bits, mode=mode)
        self.weight, self.scales = packed[0], packed[1]
        if len(packed) > 2:
            self.biases = packed[2]

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(
            x.swapaxes(0, 1),
            self.weight,
            self.scales,
            self.get("biases"),
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        return y.swapaxes(0, 1)


def split_kv_b_proj(weight: mx.array, num_heads: int, nope_dim: int) -> tuple[mx.array, mx.array]:
    """kv_b_proj [H * (nope + v), r] -> embed_q [H, r, nope] (the key part, transposed:
    it maps a query's no-rope part into the latent) and unembed_out [H, v, r]."""
    per_head = weight.reshape(num_heads, weight.shape[0] // num_heads, weight.shape[1])
    embed_q = mx.contiguous(per_head[:, :nope_dim].swapaxes(-1, -2))
    unembed_out = mx.contiguous(per_head[:, nope_dim:])
    return embed_q, unembed_out


class LatentAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        bias: bool,
        rope: RotaryEmbedding,
        attention_factor: float,
        scale: float,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.nope_dim, self.rope_dim = qk_nope_head_dim, qk_rope_head_dim
        self.kv_lora_rank = kv_lora_rank
        q_dim = num_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(kv_lora_rank, eps=LATENT_NORM_EPS)
        self.embed_q = MultiLinear(qk_nope_head_dim, kv_lora_rank, num_heads)
        self.unembed_out = MultiLinear(kv_lora_rank, v_head_dim, num_heads)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)
        self.rope = rope
        # YaRN scales the rotation's cos and sin by attention_factor, for q and k alike, so
        # the rope part of every score by its square: applied once, to the query's rope dims.
        self.rope_gain = attention_factor**2
        self.scale = scale

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        t = x.shape[0]
        if "q_proj" in self:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q[..., : self.nope_dim], q[..., self.nope_dim :]
        compressed = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(compressed[:, : self.kv_lora_rank])
        k_pe = compressed[:, self.kv_lora_rank :]
        q_pe = self.rope(q_pe[:, :, None], positions)
        if self.rope_gain != 1.0:
            q_pe = q_pe * self.rope_gain
        k_pe = self.rope(k_pe[:, None, None], positions)  # [T, 1, rope]
        query = mx.concatenate([self.embed_q(q_nope), q_pe], axis=-1)  # [T, H, r + rope]
        key = mx.concatenate([latent[:, None], k_pe], axis=-1)  # [T, 1, r + rope]
        o = paged_attention(query, key, None, cache, meta, self.scale)  # [T, H * r]
        o = self.unembed_out(o.reshape(t, self.num_heads, self.kv_lora_rank))
        return self.o_proj(o.reshape(t, -1))

    def shard(self, group: mx.distributed.Group) -> None:
        """Tensor parallelism: this rank's query heads (their q projection rows, embed_q
        and unembed_out), o_proj's matching columns with an all_sum after it. The latent
        and its projection are the same on every rank, so each rank caches it whole: a
        latent cache is not split by heads."""
        n = group.size()
        name = "q_proj" if "q_proj" in self else "q_b_proj"
        setattr(self, name, shard_linear(self[name], "all-to-sharded", group=group))
        for per_head in (self.embed_q, self.unembed_out):  # [H, ...], heads first
            shard_inplace(per_head, lambda _path, _w: 0, group=group)
        self.o_proj = shard_linear(self.o_proj, "sharded-to-all", group=group)
        self.num_heads //= n
