"""Qwen3 builders (Qwen3-0.6B / Qwen3-30B-A3B conventions): per-head q/k norms, an explicit
head_dim, no biases, ChatML tokens; the MoE one with experts stored one by one, as the Hub
has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm, decoder_config_fields
from .qwen2 import write_qwen_tokenizer
from .tokenizer import EOT_ID, GPT2_VOCAB


def _qwen3_config(p: dict[str, Any], model_type: str, arch: str) -> dict[str, Any]:
    # Field set of Qwen/Qwen3-0.6B's config.json (4.x style), plus the MoE fields.
    config = {
        **decoder_config_fields(p),
        "architectures": [arch],
        "attention_bias": False,
        "eos_token_id": EOT_ID + 2,
        "head_dim": p["head_dim"],
        "max_window_layers": p["num_hidden_layers"],
        "model_type": model_type,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
    }
    for key in (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    ):
        if key in p:
            config[key] = p[key]
    return config


def _build(out: Path, p: dict[str, Any], model_type: str, arch: str) -> None:
    build_causal_lm(
        out,
        p,
        cls_name=arch,
        classic_config=_qwen3_config(p, model_type, arch),
        generation_config={"bos_token_id": EOT_ID, "eos_token_id": [EOT_ID + 2, EOT_ID]},
        real_vocab=GPT2_VOCAB + 2,
    )
    write_qwen_tokenizer(out, p)


def build_qwen3(out: Path, p: dict[str, Any]) -> None:
    _build(out, p, "qwen3", "Qwen3ForCausalLM")


def build_qwen3_moe(out: Path, p: dict[str, Any]) -> None:
    _build(out, p, "qwen3_moe", "Qwen3MoeForCausalLM")


def build_qwen3_moe_hf5(out: Path, p: dict[str, Any]) -> None:
    """Plain transformers-5 save_pretrained: config.json names the expert count
    num_local_experts (Qwen3MoeConfig's attribute_map makes num_experts its alias) and
    carries rope_parameters; the experts, fused in memory, are saved one by one."""
    build_causal_lm(
        out,
        p,
        cls_name="Qwen3MoeForCausalLM",
        classic_config=None,
        generation_config={"bos_token_id": EOT_ID, "eos_token_id": [EOT_ID + 2, EOT_ID]},
        real_vocab=GPT2_VOCAB + 2,
    )
    write_qwen_tokenizer(out, p)
