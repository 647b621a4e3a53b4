"""DeepSeek-V3 builders.

The Hub's (deepseek-ai/DeepSeek-V3 conventions), through transformers: multi-head latent
attention with a compressed query, YaRN rope, one dense layer then group-routed experts
one by one plus a shared expert, the Hub's 4.x config field set. The routers'
load-balancing biases (a buffer, which randomize_ leaves at zero) get random values, so
that a loader ignoring them, or routing without them, changes the tokens.

mlx-community's, through mlx-lm's own classes and its quantize_model / save_model /
save_config, as `mlx_lm.convert -q` writes it: experts stacked as switch_mlp, kv_b_proj
split into embed_q / unembed_out, quantized where the input width takes the group size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm, decoder_config_fields
from .tokenizer import EOT_ID, write_gpt2_tokenizer

_FIELDS = (
    "first_k_dense_replace",
    "kv_lora_rank",
    "moe_intermediate_size",
    "moe_layer_freq",
    "n_group",
    "n_routed_experts",
    "n_shared_experts",
    "norm_topk_prob",
    "num_experts_per_tok",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "rope_scaling",
    "routed_scaling_factor",
    "topk_group",
    "v_head_dim",
)


def _deepseek_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of deepseek-ai/DeepSeek-V3's config.json, less its auto_map (remote code).
    return {
        **decoder_config_fields(p),
        **{k: p[k] for k in _FIELDS},
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "aux_loss_alpha": 0.001,
        "eos_token_id": EOT_ID,
        "ep_size": 1,
        "model_type": "deepseek_v3",
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "topk_method": "noaux_tc",
    }


def _randomize_router_biases(model: Any, seed: int) -> None:
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.5)


def build_deepseek_v3(out: Path, p: dict[str, Any]) -> None:
    build_causal_lm(
        out,
        p,
        cls_name="DeepseekV3ForCausalLM",
        classic_config=_deepseek_config(p),
        tweak=lambda model: _randomize_router_biases(model, p["seed"]),
    )
    write_gpt2_tokenizer(out, p["max_position_embeddings"])


def mlx_lm_config(p: dict[str, Any]) -> dict[str, Any]:
    """The config mlx-lm builds its model from (what mlx-community's config.json holds,
    before quantize_model adds its quantization entry)."""
    skip = ("seed", "bits", "group_size", "mlx_lm")
    return {
        **{k: v for k, v in p.items() if k not in skip},
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "eos_token_id": EOT_ID,
        "bos_token_id": EOT_ID,
    }


def build_deepseek_v3_mlx_community(out: Path, p: dict[str, Any]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import deepseek_v3 as mlx_lm_deepseek
    from mlx_lm.utils import quantize_model, save_config, save_model

    config = mlx_lm_config(p)
    mx.random.seed(p["seed"])
    model = mlx_lm_deepseek.Model(mlx_lm_deepseek.ModelArgs.from_dict(config))
    randomized = []
    for key, value in tree_flatten(model.parameters()):
        noise = mx.random.normal(value.shape)
        if key.endswith("norm.weight"):
            randomized.append((key, 1 + 0.1 * noise))
        elif value.ndim == 1:  # the routers' load-balancing biases
            randomized.append((key, 0.5 * noise))
        else:  # matrices: std 2 / sqrt(fan_in), as weights.py's MATRIX_GAIN
            randomized.append((key, noise * (2.0 / value.shape[-1] ** 0.5)))
    model.load_weights(randomized)
    model, config = quantize_model(model, config, p["group_size"], p["bits"])
    save_model(out, model)
    save_config(config, out / "config.json")
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
