"""Mixtral builder: the Mistral decoder with a sparse mixture of experts, saved in the Hub
layout (block_sparse_moe.experts.N.w1/w2/w3, 4.x config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm, decoder_config_fields
from .tokenizer import EOT_ID, write_gpt2_tokenizer


def _mixtral_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of mistralai/Mixtral-8x7B-v0.1's config.json.
    return {
        **decoder_config_fields(p),
        "architectures": ["MixtralForCausalLM"],
        "eos_token_id": EOT_ID,
        "model_type": "mixtral",
        "num_experts_per_tok": p["num_experts_per_tok"],
        "num_local_experts": p["num_local_experts"],
        "output_router_logits": False,
        "router_aux_loss_coef": 0.02,
        "sliding_window": p.get("sliding_window"),
    }


def build_mixtral(out: Path, p: dict[str, Any]) -> None:
    build_causal_lm(out, p, cls_name="MixtralForCausalLM", classic_config=_mixtral_config(p))
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
