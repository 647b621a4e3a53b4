"""DeepSeek-V3 (also DeepSeek-R1 and Kimi-K2, which share its architecture) in MLX.

Multi-head latent attention over a latent paged cache (models/mla.py), then a SwiGLU MLP
on the first first_k_dense_replace layers and a mixture of experts on the rest: one or
more always-on shared experts plus n_routed_experts routed ones, chosen by sigmoid scores
in groups (`switch.group_route`). Multi-token-prediction layers that checkpoints carry past the
last decoder layer are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from nanovllm_mlx.models import llama
from nanovllm_mlx.models.base import check_divides
from nanovllm_mlx.models.mla import LatentAttention, softmax_scale, split_kv_b_proj
from nanovllm_mlx.models.rope import RotaryEmbedding, rope_inv_freq
from nanovllm_mlx.models.switch import SwitchGLU, group_route, stack_experts, stacked_layouts

_EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


@dataclass  # not slots: from_dict's zero-argument super() needs the class it was written in
class ModelArgs(llama.ModelArgs):
    model_type: str = "deepseek_v3"
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    quantization_config: dict | None = None  # DeepSeek's FP8 release: weight_block_size

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        # transformers' attribute_map alias (the name a transformers 5 config may carry).
        if "n_routed_experts" not in config and "num_local_experts" in config:
            config = {**config, "n_routed_experts": config["num_local_experts"]}
        args = super().from_dict(config)
        assert isinstance(args, ModelArgs)
        # null is meaningful here (from_dict skips None values): no query compression
        # (DeepSeek-V2-Lite's q_proj), no shared experts, no routed experts (all dense).
        if "q_lora_rank" in config:
            args.q_lora_rank = config["q_lora_rank"]
        for name in ("n_shared_experts", "n_routed_experts"):
            if name in config and config[name] is None:
                setattr(args, name, 0)
        args.validate()
        return args

    def validate(self) -> None:
        if not self.n_routed_experts:
            return  # dense: no router
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise ValueError(
                f"unsupported DeepSeek router (scoring_func {self.scoring_func!r}, topk_method "
                f"{self.topk_method!r}): only DeepSeek-V3's sigmoid noaux_tc routing is"
            )
        experts, groups = self.n_routed_experts, self.n_group
        if groups < 1 or experts % groups or not 1 <= self.topk_group <= groups:
            raise ValueError(
                f"n_group {groups} must divide n_routed_experts {experts}, and topk_group "
                f"{self.topk_group} lie in [1, n_group]"
            )
        if groups > 1 and experts // groups < 2:
            raise ValueError(
                f"group routing scores each group by its top 2 experts: n_routed_experts "
                f"{experts} in {groups} groups leaves fewer than 2 a group"
            )
        if not 1 <= self.num_experts_per_tok <= experts // groups * self.topk_group:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must lie in [1, the experts "
                f"of topk_group groups ({experts // groups * self.topk_group})]"
            )

    def is_sparse(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )


def dequantize_fp8(weight: mx.array, scale_inv: mx.array, block: tuple[int, int]) -> mx.array:
    """DeepSeek's FP8 release: e4m3 weights (MLX reads them as uint8) times one scale per
    block[0] x block[1] tile (weight_scale_inv, despite its name a multiplier) ->
    bfloat16, the dtype the release was trained and converted from."""
    rows, cols = weight.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    if weight.dtype != mx.uint8 or tuple(scale_inv.shape) != tiles:
        raise ValueError(
            f"FP8 weight {tuple(weight.shape)} ({weight.dtype}) with scales "
            f"{tuple(scale_inv.shape)} does not fit {block[0]}x{block[1]} tiles ({tiles})"
        )
    scale = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), block[0], 0), block[1], 1)
    return (mx.from_fp8(weight, dtype=mx.float32) * scale[:rows, :cols]).astype(mx.bfloat16)


def _layer_index(key: str) -> int:
    """N of a model.layers.N... tensor; -1 for the others."""
    parts = key.split(".", 3)
    if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit():
        return int(parts[2])
    return -1


class Router(nn.Module):
    """The gate: weight [E, D] and the selection bias e_score_correction_bias [E], both
    computed in float32 whatever the model's dtype, as transformers keeps them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        a = self.args
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        return group_route(
            logits,
            self.e_score_correction_bias.astype(mx.float32),
            a.num_experts_per_tok,
            a.n_group,
            a.topk_group,
            a.norm_topk_prob,
            a.routed_scaling_factor,
        )


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        # mlx-lm's name for the stacked experts: mlx-community checkpoints then load as
        # they are, without a sanitize pass.
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        )
        if args.n_shared_experts:
            hidden = args.moe_intermediate_size * args.n_shared_experts
            self.shared_experts = llama.MLP(args, hidden)
        self.group: mx.distributed.Group | None = None  # set by shard

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.gate(x)
        y = self.switch_mlp(x, mx.stop_gradient(indices))
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        if self.group is not None:  # each rank's experts hold a slice of every expert
            y = mx.distributed.all_sum(y, group=self.group)
        return y

    def shard(self, group: mx.distributed.Group) -> None:
        """Every expert (routed and shared) split along its hidden dim, in place: the
        router, which every rank runs whole, picks the same experts everywhere, and one
        all_sum adds the ranks' parts of routed and shared experts together."""
        experts = [self.switch_mlp] + ([self.shared_experts] if "shared_experts" in self else [])
        for mlp in experts:
            group_size = getattr(mlp.down_proj, "group_size", None)
            hidden = mlp.gate_proj.weight.shape[-2]
            if group_size and (hidden // group.size()) % group_size:
                raise ValueError(
                    f"tensor_parallel_size {group.size()} splits the experts' {hidden} hidden "
                    f"units into parts that are not whole quantization groups of {group_size}: "
                    "use a size that keeps them whole"
                )
            shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
            shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
            shard_inplace(mlp.down_proj, "sharded-to-all", group=group)
        self.group = group


class Model(llama.Model):
    # Kept float32 by the loader's cast, as transformers keeps them.
    float32_parameters = ("gate.weight", "gate.e_score_correction_bias")

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        # One latent KV "head" per layer: [c_kv, k_pe], the values its first kv_lora_rank.
        self.spec = replace(
            self.spec,
            n_kv_heads=1,
            head_dim=args.kv_lora_rank + args.qk_rope_head_dim,
            latent_value_dim=args.kv_lora_rank,
        )

    def make_rope(self, args: llama.ModelArgs) -> tuple[RotaryEmbedding, float]:
        assert isinstance(args, ModelArgs)
        dim = args.qk_rope_head_dim
        inv_freq, attention_factor = rope_inv_freq(
            dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings
        )
        return RotaryEmbedding(dim, inv_freq, traditional=args.rope_interleave), attention_factor

    def make_layer(self, index: int, window: int | None) -> llama.DecoderLayer:
        args = self.args
        assert isinstance(args, ModelArgs)
        attention = LatentAttention(
            args.hidden_size,
            args.num_attention_heads,
            args.q_lora_rank,
            args.kv_lora_rank,
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
            args.v_head_dim,
            args.attention_bias,
            self.rope,
            self.attention_factor,
            softmax_scale(args.qk_nope_head_dim + args.qk_rope_head_dim, args.rope_scaling),
        )
        mlp = MoE(args) if args.is_sparse(index) else llama.MLP(args)
        return llama.DecoderLayer(args, attention, mlp)

    def shard(self, group: mx.distributed.Group) -> None:
        """Attention heads and every MLP's hidden units split across the ranks (see
        LatentAttention.shard and MoE.shard); the latent cache stays whole on every rank,
        so the spec does not change."""
        n, args = group.size(), self.args
        assert isinstance(args, ModelArgs)
        check_divides(
            n,
            attention_heads=args.num_attention_heads,
            intermediate_size=args.intermediate_size,
            moe_intermediate_size=args.moe_intermediate_size,
        )
        for layer in self.layers:
            layer.self_attn.shard(group)
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                mlp.shard(group)
            else:
                mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
                mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
                mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hub layout (experts one by one; kv_b_proj whole; FP8 tiles in DeepSeek's own
        release) or transformers 5's fused experts -> stacked experts (switch_mlp) and
        kv_b_proj split into embed_q / unembed_out: mlx-lm's names and layout, which
        mlx-community checkpoints hold.
        Multi-token-prediction layers (model.layers.{num_hidden_layers}...) are dropped."""
        args = self.args
        assert isinstance(args, ModelArgs)
        n = args.num_hidden_layers
        weights = {k: v for k, v in weights.items() if _layer_index(k) < n}
        quant = args.quantization_config or {}
        block = tuple(quant.get("weight_block_size") or (128, 128))
        for key in [k for k in weights if k.endswith(".weight_scale_inv")]:
            name = key.removesuffix("_scale_inv")
            if name not in weights or len(block) != 2:
                raise ValueError(f"{key} has no FP8 weight {name} it scales (block {block})")
            weights[name] = dequantize_fp8(weights[name], weights.pop(key), (block[0], block[1]))
        weights = stacked_layouts(weights)
        for i in range(n):
            prefix = f"model.layers.{i}"
            weights = stack_experts(
                weights, f"{prefix}.mlp.experts", args.n_routed_experts, _EXPERT_NAMES
            )
            kv_b = weights.pop(f"{prefix}.self_attn.kv_b_proj.weight", None)
            if kv_b is not None:
                embed_q, unembed_out = split_kv_b_proj(
                    kv_b, args.num_attention_heads, args.qk_nope_head_dim
                )
                weights[f"{prefix}.self_attn.embed_q.weight"] = embed_q
                weights[f"{prefix}.self_attn.unembed_out.weight"] = unembed_out
        weights = {k.replace(".mlp.experts.", ".mlp.switch_mlp."): v for k, v in weights.items()}
        return super().sanitize(weights)
