"""Gemma 4 (its text model) in MLX, reading and writing a paged KV cache.

What differs from Gemma 3 (gemma3.py): norms scale by w, not 1 + w; values are RMS-normed
(no weight) as well as queries and keys, and the softmax scale is 1; global layers have
their own head size (`global_head_dim`) and may have fewer KV heads, whose values are the
keys' projection (`attention_k_eq_v`); their rotation is "proportional" (only the first
`partial_rotary_factor` of the frequencies turn); the last `num_kv_shared_layers` layers
compute no keys or values and read those of the last earlier layer of their kind; each
layer may add a per-layer embedding (PLE: a second embedding table, mixed with a
projection of the token's embedding, gated into the residual stream after the MLP) and a
mixture of experts beside its dense MLP; each layer's output is scaled by `layer_scalar`.

One pool shape serves every layer (the engine sizes one per layer alike): the widest head
and the most KV heads. A layer with narrower heads pads q, k and v with zeros (the scores
and the kept output columns are unchanged), one with fewer KV heads repeats each, as
grouped-query attention does anyway. KV-shared layers read their producer's pool and
never write; their own pools stay allocated, unused (a waste of num_kv_shared_layers /
num_hidden_layers of the KV memory). The configuration is read in gemma4_args.py.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.models.base import CausalLM, ModelSpec, layer_windows
from nanovllm_mlx.models.gemma4_args import ModelArgs, rotary
from nanovllm_mlx.models.rope import RotaryEmbedding
from nanovllm_mlx.models.switch import SwitchGLU, route, stacked_layouts


def rms(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, index: int, pool: tuple[int, int], rope: RotaryEmbedding):
        super().__init__()
        assert args.layer_types is not None and args.layer_heads is not None
        kind = args.layer_types[index]
        self.head_dim, self.n_kv_heads = args.layer_heads[index]
        self.pool_head_dim, self.pool_kv_heads = pool
        self.n_heads, self.eps = args.num_attention_heads, args.rms_norm_eps
        self.window = args.sliding_window if kind == "sliding_attention" else None
        self.shared = args.kv_sources()[index] != index
        hd, dim, bias = self.head_dim, args.hidden_size, args.attention_bias
        self.k_eq_v = args.attention_k_eq_v and kind == "full_attention"
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=self.eps)
        if not self.shared:
            self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
            self.k_norm = nn.RMSNorm(hd, eps=self.eps)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.rope = rope

    def _to_pool(self, x: mx.array) -> mx.array:
        """[T, H, hd] -> the pool's head size (zero padding), H as given."""
        pad = self.pool_head_dim - self.head_dim
        return mx.pad(x, [(0, 0), (0, 0), (0, pad)]) if pad else x

    def __call__(
        self, x: mx.array, positions: mx.array, cache: KVCache, meta: AttentionMetadata
    ) -> mx.array:
        t, hd = x.shape[0], self.head_dim
        q = self.q_norm(self.q_proj(x).reshape(t, self.n_heads, 1, hd))
        q = self._to_pool(self.rope(q, positions))
        k = v = None
        if not self.shared:
            raw_k = self.k_proj(x).reshape(t, self.n_kv_heads, hd)
            raw_v = raw_k if self.k_eq_v else self.v_proj(x).reshape(t, self.n_kv_heads, hd)
            k = self.rope(self.k_norm(raw_k)[:, :, None], positions)
            v = rms(raw_v, self.eps)
            r = self.pool_kv_heads // self.n_kv_heads
            k, v = (self._to_pool(mx.repeat(a, r, axis=1) if r > 1 else a) for a in (k, v))
        out = paged_attention(q, k, v, cache, meta, 1.0, self.window)
        if self.pool_head_dim != hd:
            out = out.reshape(t, self.n_heads, self.pool_head_dim)[:, :, :hd].reshape(t, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


def gelu_glu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


class Router(nn.Module):
    """RMS-normed input (no weight) times `scale` / sqrt(hidden), softmax over experts, the
    top k renormalized, then each chosen expert's `per_expert_scale`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.num_experts is not None and args.top_k_experts is not None
        self.k, self.eps = args.top_k_experts, args.rms_norm_eps
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self.root = args.hidden_size**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = self.proj(rms(x, self.eps) * self.scale * self.root)
        indices, weights = route(logits, self.k, normalize=True)
        return indices, weights * self.per_expert_scale[indices].astype(mx.float32)


class Experts(nn.Module):
    """The experts, under mlx-lm's name (`experts.switch_glu`), so that mlx-community's
    checkpoints load as they are."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.num_experts is not None and args.moe_intermediate_size is not None
        self.switch_glu = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.num_experts, activation=gelu_glu
        )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int, pool: tuple[int, int], rope: RotaryEmbedding):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, index, pool, rope)
        wide = args.use_double_wide_mlp and self.self_attn.shared
        self.mlp = MLP(dim, args.intermediate_size * (2 if wide else 1))
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            setattr(self, name, nn.RMSNorm(dim, eps=eps))
        self.layer_scalar = mx.ones((1,))
        self.moe = args.enable_moe_block
        if self.moe:
            self.router = Router(args)
            self.experts = Experts(args)
            self.post_feedforward_layernorm_1 = nn.RMSNorm(dim, eps=eps)
            self.post_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
            self.pre_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
        self.ple = args.hidden_size_per_layer_input
        if self.ple:
            self.per_layer_input_gate = nn.Linear(dim, self.ple, bias=False)
            self.per_layer_projection = nn.Linear(self.ple, dim, bias=False)
            self.post_per_layer_input_norm = nn.RMSNorm(dim, eps=eps)

    def __call__(
        self,
        x: mx.array,
        per_layer: mx.array | None,
        positions: mx.array,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), positions, cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            indices, weights = self.router(x)  # routed on the MLP's input, before its norm
            y = self.experts.switch_glu(
                self.pre_feedforward_layernorm_2(x), mx.stop_gradient(indices)
            )
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(y)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            assert per_layer is not None
            g = nn.gelu_approx(self.per_layer_input_gate(x)) * per_layer
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        assert args.layer_types is not None and args.layer_heads is not None
        windows = layer_windows(args.layer_types, args.sliding_window, args.max_position_embeddings)
        pool = (max(h for h, _ in args.layer_heads), max(k for _, k in args.layer_heads))
        for i, (_, kv) in enumerate(args.layer_heads):
            if pool[1] % kv or args.num_attention_heads % pool[1]:
                raise ValueError(
                    f"layer {i}'s {kv} KV heads do not divide the widest layer's {pool[1]}"
                )
        self.spec = ModelSpec(
            n_layers=args.num_hidden_layers,
            n_kv_heads=pool[1],
            head_dim=pool[0],
            context_length=args.max_position_embeddings,
            vocab_size=args.vocab_size,
            layer_windows=windows,
        )
        ropes: dict[str, RotaryEmbedding] = {}
        for kind, (hd, _) in zip(args.layer_types, args.layer_heads):
            ropes.setdefault(kind, rotary(args, kind, hd))
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, i, pool, ropes[t]) for i, t in enumerate(args.layer_types)
        ]
        self.kv_sources = args.kv_sources()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        p = args.hidden_size_per_layer_input
        if p:
            n = args.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, n * p)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, n * p, bias=False)
            self.per_layer_projection_norm = nn.RMSNorm(p, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def _per_layer_inputs(self, input_ids: mx.array, x: mx.array) -> mx.array:
        """[T, layers, P]: the token's own per-layer embedding mixed with a projection of
        its (scaled) embedding, as transformers' get/project_per_layer_inputs do."""
        n, p = self.args.num_hidden_layers, self.args.hidden_size_per_layer_input
        own = self.embed_tokens_per_layer(input_ids)
        own = own * mx.array(math.sqrt(p), dtype=own.dtype)
        proj = self.per_layer_model_projection(x) * (self.args.hidden_size**-0.5)
        proj = self.per_layer_projection_norm(proj.reshape(-1, n, p))
        return (proj + own.reshape(-1, n, p)) * (2.0**-0.5)

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> mx.array:
        x = self.embed_tokens(input_ids)
        # transformers rounds the scale to the weights' dtype first, as Gemma 3 does.
        x = x * mx.array(math.sqrt(self.args.hidden_size), dtype=x.dtype)
        per_layer = (
            self._per_layer_inputs(input_ids, x) if self.args.hidden_size_per_layer_input else None
        )
        for i, layer in enumerate(self.layers):
            ple = None if per_layer is None else per_layer[:, i]
            x = layer(x, ple, positions, caches[self.kv_sources[i]], meta)
        return self.norm(x)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            logits = self.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub names (text-only `model.`, or the multimodal checkpoint's language model)
        onto ours; the fused experts ([E, 2I, D]: gate rows, then up rows) split."""
        out = {}
        for key, value in weights.items():
            for prefix in ("model.language_model.", "language_model.model.", "model."):
                if key.startswith(prefix):
                    key = key.removeprefix(prefix)
                    break
            if key.startswith(("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")):
                continue  # the image and audio towers
            if self.args.tie_word_embeddings and key.startswith("lm_head."):
                continue
            out[key] = value
        # mlx-lm's name for the experts is ours already (mlx-community checkpoints).
        return {
            k if ".experts.switch_glu." in k else k.replace(".experts.", ".experts.switch_glu."): v
            for k, v in stacked_layouts(out).items()
        }
