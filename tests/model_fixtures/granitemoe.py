"""Granite MoE builder (ibm-granite/granite-3.1-1b-a400m conventions): experts fused per
layer in the Hub file (block_sparse_moe.input_linear / output_linear, router.layer), the
four Granite multipliers at non-trivial values, a tied head, 4.x config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm, decoder_config_fields
from .tokenizer import EOT_ID, write_gpt2_tokenizer


def _granite_config(p: dict[str, Any]) -> dict[str, Any]:
    return {
        **decoder_config_fields(p),
        "architectures": ["GraniteMoeForCausalLM"],
        "attention_bias": False,
        "attention_multiplier": p["attention_multiplier"],
        "embedding_multiplier": p["embedding_multiplier"],
        "eos_token_id": EOT_ID,
        "logits_scaling": p["logits_scaling"],
        "model_type": "granitemoe",
        "num_experts_per_tok": p["num_experts_per_tok"],
        "num_local_experts": p["num_local_experts"],
        "residual_multiplier": p["residual_multiplier"],
        "router_aux_loss_coef": 0.0,
    }


def build_granitemoe(out: Path, p: dict[str, Any]) -> None:
    build_causal_lm(out, p, cls_name="GraniteMoeForCausalLM", classic_config=_granite_config(p))
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
