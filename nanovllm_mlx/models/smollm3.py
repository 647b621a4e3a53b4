"""SmolLM3 in MLX: the Llama decoder with NoPE layers, attention that sees no rotary position
(every no_rope_layer_interval-th layer by default, or as no_rope_layers lists: 1 rotates,
0 does not). When use_sliding_window is set, the NoPE layers are the sliding ones, as
transformers' SmolLM3Config derives layer_types.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from nanovllm_mlx.models import llama
from nanovllm_mlx.models.base import layer_windows


@dataclass(slots=True)
class ModelArgs(llama.ModelArgs):
    model_type: str = "smollm3"
    rope_theta: float = 2_000_000.0
    tie_word_embeddings: bool = True
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        args = llama.ModelArgs.from_dict.__func__(cls, config)  # type: ignore[attr-defined]
        assert isinstance(args, ModelArgs)
        n = args.num_hidden_layers
        if args.no_rope_layers is None:
            if args.no_rope_layer_interval < 1:
                raise ValueError(
                    f"no_rope_layer_interval must be >= 1, got {args.no_rope_layer_interval}"
                )
            every = args.no_rope_layer_interval
            args.no_rope_layers = [int((i + 1) % every != 0) for i in range(n)]
        if len(args.no_rope_layers) < n:
            raise ValueError(
                f"no_rope_layers has {len(args.no_rope_layers)} entries for {n} layers"
            )
        return args

    def uses_rope(self, layer: int) -> bool:
        assert self.no_rope_layers is not None
        return bool(self.no_rope_layers[layer])

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        types = self.layer_types
        if types is None and self.use_sliding_window and self.sliding_window:
            types = [
                "full_attention" if self.uses_rope(i) else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        return layer_windows(types, self.sliding_window, self.max_position_embeddings)


class NoRope:
    """The rotation a NoPE layer applies: none (the rotation's shape contract only:
    [T, H, 1, D] -> [T, H, D])."""

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        return x.squeeze(2)


class Model(llama.Model):
    def make_layer(self, index: int, window: int | None) -> llama.DecoderLayer:
        args = self.args
        assert isinstance(args, ModelArgs)
        attn = self.attention(window)
        if not args.uses_rope(index):
            attn.rope = NoRope()  # type: ignore[assignment]
        return llama.DecoderLayer(args, attn, llama.MLP(args))
