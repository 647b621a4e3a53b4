"""Llama builders: transformers-5 style (llama-tiny, the SmolLM2-135M shape) and the 4.x
Hub style with llama3 rope scaling (llama3-tiny)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm, decoder_config_fields
from .tokenizer import EOT_ID, GPT2_VOCAB, write_gpt2_tokenizer


def llama_classic_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of meta-llama/Llama-3.2-1B's config.json (transformers 4.x style: top-level
    # rope_theta + rope_scaling, torch_dtype), as most Hub checkpoints still have it.
    return {
        **decoder_config_fields(p),
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "eos_token_id": EOT_ID,
        "head_dim": p["head_dim"],
        "mlp_bias": False,
        "model_type": "llama",
        "pretraining_tp": 1,
        "rope_scaling": p.get("rope_scaling"),
    }


def build_llama(out: Path, p: dict[str, Any]) -> None:
    # Plain transformers-5 save_pretrained: config.json carries rope_parameters, not rope_theta.
    # A vocabulary smaller than GPT-2's (the SmolLM2 shape) has no padding rows, and the
    # probe ids of the checks must stay inside it.
    build_causal_lm(
        out,
        p,
        cls_name="LlamaForCausalLM",
        classic_config=None,
        real_vocab=min(p["vocab_size"], GPT2_VOCAB),
    )
    write_gpt2_tokenizer(out, p["max_position_embeddings"])


def build_llama_classic(out: Path, p: dict[str, Any]) -> None:
    build_causal_lm(
        out,
        p,
        cls_name="LlamaForCausalLM",
        classic_config=llama_classic_config(p),
        generation_config={"bos_token_id": EOT_ID, "eos_token_id": EOT_ID},
    )
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
