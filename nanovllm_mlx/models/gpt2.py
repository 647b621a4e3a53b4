"""GPT-2 (small, medium, large, xl) in MLX, reading and writing a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache
from nanovllm_mlx.attention.paged import paged_attention
from nanovllm_mlx.models.base import CausalLM, ModelSpec, check_divides


@dataclass(slots=True)
class ModelArgs:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        args = cls(**{k: config[k] for k in cls.__slots__ if k in config})
        if args.n_embd % args.n_head:
            raise ValueError(f"n_embd {args.n_embd} is not divisible by n_head {args.n_head}")
        if args.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"unsupported GPT-2 activation {args.activation_function!r}")
        return args


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head = args.n_head
        self.head_dim = args.n_embd // args.n_head
        self.scale = self.head_dim**-0.5
        self.c_attn = nn.Linear(args.n_embd, 3 * args.n_embd)
        self.c_proj = nn.Linear(args.n_embd, args.n_embd)

    def __call__(self, x: mx.array, cache: KVCache, meta: AttentionMetadata) -> mx.array:
        # Views of the fused projection, not copies.
        shape = (x.shape[0], self.n_head, self.head_dim)
        q, k, v = (t.reshape(shape) for t in mx.split(self.c_attn(x), 3, axis=-1))
        out = paged_attention(q, k, v, cache, meta, self.scale)
        return self.c_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.c_fc = nn.Linear(args.n_embd, 4 * args.n_embd)
        self.c_proj = nn.Linear(4 * args.n_embd, args.n_embd)
        self.act = nn.gelu if args.activation_function == "gelu" else nn.gelu_approx

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, cache: KVCache, meta: AttentionMetadata) -> mx.array:
        x = x + self.attn(self.ln_1(x), cache, meta)
        return x + self.mlp(self.ln_2(x))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.spec = ModelSpec(
            n_layers=args.n_layer,
            n_kv_heads=args.n_head,
            head_dim=args.n_embd // args.n_head,
            context_length=args.n_positions,
            vocab_size=args.vocab_size,
        )
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = [Block(args) for _ in range(args.n_layer)]
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> mx.array:
        x = self.wte(input_ids) + self.wpe(positions)
        for block, cache in zip(self.h, caches):
            x = block(x, cache, meta)
        return self.ln_f(x)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.wte.as_linear(hidden)

    def shard(self, group: mx.distributed.Group) -> None:
        n = group.size()
        check_divides(n, attention_heads=self.args.n_head, mlp_width=4 * self.args.n_embd)
        for block in self.h:
            attn, mlp = block.attn, block.mlp
            # The fused projection holds q, k and v one after the other: each is split
            # by heads, so a rank keeps its heads of all three.
            attn.c_attn = shard_linear(attn.c_attn, "all-to-sharded", segments=3, group=group)
            attn.c_proj = shard_linear(attn.c_proj, "sharded-to-all", group=group)
            attn.n_head //= n
            mlp.c_fc = shard_linear(mlp.c_fc, "all-to-sharded", group=group)
            mlp.c_proj = shard_linear(mlp.c_proj, "sharded-to-all", group=group)
        self.spec = replace(self.spec, n_kv_heads=self.spec.n_kv_heads // n)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map both Hub layouts (bare keys, Conv1D [in, out]), transformers 5's
        `transformer.`-prefixed layout and mlx-lm's (`model.`-prefixed, already [out, in])
        onto this module's names."""
        out = {}
        for key, value in weights.items():
            mlx_lm = key.startswith("model.")
            key = key.removeprefix("transformer.").removeprefix("model.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key.startswith("lm_head."):
                continue  # causal-mask buffers; the head is tied to wte
            if not mlx_lm and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                value = value.T  # Conv1D stores [in, out]; nn.Linear wants [out, in]
            out[key] = value
        return out
