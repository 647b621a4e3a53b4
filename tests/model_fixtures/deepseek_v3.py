"""DeepSeek-V3 builder (deepseek-ai/DeepSeek-V3 conventions): multi-head latent attention
with a compressed query, YaRN rope, one dense layer then group-routed experts one by one
plus a shared expert, the Hub's 4.x config field set. The routers' load-balancing biases
(a buffer, which randomize_ leaves at zero) get random values, so that a loader ignoring
them, or routing without them, changes the tokens."""

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
