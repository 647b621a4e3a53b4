"""Qwen3 (dense) in MLX: the Llama decoder with an RMSNorm over each head's queries and
keys before the rotation, and no q/k/v biases."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.models import llama
from nanovllm_mlx.models.rope import RotaryEmbedding


@dataclass(slots=True)
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen3"


class Attention(llama.Attention):
    def __init__(
        self,
        args: llama.ModelArgs,
        rope: RotaryEmbedding,
        attention_factor: float,
        window: int | None = None,
    ):
        super().__init__(args, rope, attention_factor, window)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def norm_qk(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        return self.q_norm(q), self.k_norm(k)


class Model(llama.Model):
    def attention(self, window: int | None) -> Attention:
        return Attention(self.args, self.rope, self.attention_factor, window)
