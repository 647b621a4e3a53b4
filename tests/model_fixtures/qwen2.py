"""Qwen2 builder (Qwen2.5-Instruct conventions): q/k/v biases, a vocabulary padded past the
tokenizer, ChatML special tokens and chat template, the 4.x Hub config style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm, decoder_config_fields
from .tokenizer import (
    EOT_ID,
    GPT2_VOCAB,
    IM_END,
    IM_START,
    TOKENIZER_FILES_JSON,
    qwen2_tokenizer_config,
    write_tokenizer,
)


def _qwen2_classic_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of Qwen/Qwen2.5-0.5B-Instruct's config.json (no head_dim; derived).
    return {
        **decoder_config_fields(p),
        "architectures": ["Qwen2ForCausalLM"],
        "eos_token_id": EOT_ID + 2,
        "max_window_layers": p["num_hidden_layers"],
        "model_type": "qwen2",
        "rope_scaling": None,
        "sliding_window": p["max_position_embeddings"],
        "use_sliding_window": False,
    }


def build_qwen2(out: Path, p: dict[str, Any]) -> None:
    # Qwen2.5-Instruct convention: config eos = <|im_end|>, generation_config stops on both.
    build_causal_lm(
        out,
        p,
        cls_name="Qwen2ForCausalLM",
        classic_config=_qwen2_classic_config(p),
        generation_config={
            "bos_token_id": EOT_ID,
            "eos_token_id": [EOT_ID + 2, EOT_ID],
            "pad_token_id": EOT_ID,
        },
        real_vocab=GPT2_VOCAB + 2,
    )
    write_qwen_tokenizer(out, p)


def write_qwen_tokenizer(out: Path, p: dict[str, Any]) -> None:
    """GPT-2's BPE behind Qwen2's pre-tokenizer, with ChatML tokens (Qwen2, Qwen3)."""
    write_tokenizer(
        out,
        files=TOKENIZER_FILES_JSON,
        config=qwen2_tokenizer_config(p["max_position_embeddings"]),
        flavour="qwen2",
        extra_special=(IM_START, IM_END),
    )
