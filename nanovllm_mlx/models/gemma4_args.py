"""Gemma 4's configuration: config.json (text-only, or a multimodal one's text_config)
read the way transformers' Gemma4TextConfig reads it, per-layer head shapes included, and
the rotations of its two layer kinds."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from nanovllm_mlx.models.rope import RotaryEmbedding

DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}


@dataclass(slots=True)
class ModelArgs:
    model_type: str = "gemma4_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 30
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    vocab_size: int = 262144
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    hidden_size_per_layer_input: int = 256  # transformers' default; 0: no per-layer inputs
    vocab_size_per_layer_input: int = 262144
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    use_bidirectional_attention: str | None = None
    # Per layer: (head_dim, num_key_value_heads), from per_layer_config / global_head_dim.
    layer_heads: list[tuple[int, int]] | None = None

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        config = config.get("text_config") or config  # the multimodal checkpoint's config
        names = [f.name for f in fields(cls)]
        args = cls(**{k: config[k] for k in names if config.get(k) is not None})
        if args.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported Gemma 4 activation {args.hidden_activation!r}")
        if args.use_bidirectional_attention == "all":
            raise ValueError("Gemma 4 with bidirectional attention is not a causal LM")
        n = args.num_hidden_layers
        if args.layer_types is None:
            args.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention"
                for i in range(n)
            ]
        if len(args.layer_types) != n:
            raise ValueError(f"layer_types has {len(args.layer_types)} entries for {n} layers")
        # transformers makes the last layer global whatever the config says (with a warning).
        args.layer_types = [*args.layer_types[:-1], "full_attention"]
        args.rope_parameters = args.rope_parameters or DEFAULT_ROPE
        overrides = config.get("per_layer_config")
        if overrides is None:  # transformers computes it at load from these two
            full = {"head_dim": config.get("global_head_dim", 512)}
            kv = config.get("num_global_key_value_heads")
            if kv is not None and config.get("attention_k_eq_v", True):
                full["num_key_value_heads"] = kv
            overrides = {
                str(i): full for i, t in enumerate(args.layer_types) if t == "full_attention"
            }
        args.layer_heads = []
        for i in range(n):
            o = overrides.get(str(i), overrides.get(i, {})) or {}  # type: ignore[call-overload]
            heads = (
                o.get("head_dim", args.head_dim),
                o.get("num_key_value_heads", args.num_key_value_heads),
            )
            if args.num_attention_heads % heads[1]:
                raise ValueError(
                    f"num_attention_heads {args.num_attention_heads} is not a multiple of "
                    f"layer {i}'s {heads[1]} KV heads"
                )
            args.layer_heads.append(heads)
        if args.enable_moe_block and not (
            args.num_experts and args.top_k_experts and args.moe_intermediate_size
        ):
            raise ValueError(
                "enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size"
            )
        if not 0 <= args.num_kv_shared_layers < n:
            raise ValueError(
                f"num_kv_shared_layers {args.num_kv_shared_layers} must be in [0, {n})"
            )
        return args

    def kv_sources(self) -> list[int]:
        """Per layer, the layer whose keys and values it reads: itself, or for the last
        num_kv_shared_layers layers the last earlier layer of the same kind."""
        assert self.layer_types is not None
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        sources = list(range(self.num_hidden_layers))
        for i in range(first_shared, self.num_hidden_layers):
            kind = self.layer_types[i]
            earlier = [j for j in range(first_shared) if self.layer_types[j] == kind]
            if not earlier:
                raise ValueError(f"KV-shared layer {i} ({kind}) has no earlier {kind} layer")
            sources[i] = earlier[-1]
        return sources


def rotary(args: ModelArgs, kind: str, head_dim: int) -> RotaryEmbedding:
    """A layer kind's rotation: default, or proportional (the first partial_rotary_factor
    of head_dim / 2 frequencies turn, the rest are 0: those dimensions keep their values)."""
    assert args.rope_parameters is not None
    params = args.rope_parameters.get(kind) or {}
    kind_of_rope = params.get("rope_type", "default")
    if kind_of_rope not in ("default", "proportional"):
        raise ValueError(f"unsupported Gemma 4 rope type {kind_of_rope!r} for {kind} layers")
    base = float(params.get("rope_theta", 10_000.0))
    fraction = params.get("partial_rotary_factor", 1.0) if kind_of_rope == "proportional" else 1.0
    turning = int(fraction * head_dim // 2)
    exponents = np.arange(0, 2 * turning, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.zeros(head_dim // 2, dtype=np.float32)
    inv_freq[:turning] = np.float32(1.0) / np.power(np.float32(base), exponents, dtype=np.float32)
    inv_freq /= np.float32(params.get("factor", 1.0))
    with np.errstate(divide="ignore"):  # a 0 frequency is an infinite period: no turn
        return RotaryEmbedding(head_dim, inv_freq)
