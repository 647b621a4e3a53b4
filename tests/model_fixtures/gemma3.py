"""Gemma 3 builder (google/gemma-3-270m conventions): a text-only Gemma3ForCausalLM with
interleaved sliding and global layers, a window small enough that test prompts pass it,
two rotary bases, query_pre_attn_scalar, a tied head; GPT-2's tokenizer, so its ids
stay comparable with the other fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm
from .tokenizer import EOT_ID, GPT2_VOCAB, write_gpt2_tokenizer


def _gemma3_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of google/gemma-3-270m's config.json (transformers 4.x style).
    return {
        "_sliding_window_pattern": p["sliding_window_pattern"],
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "final_logit_softcapping": None,
        "head_dim": p["head_dim"],
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "layer_types": [
            "full_attention" if (i + 1) % p["sliding_window_pattern"] == 0 else "sliding_attention"
            for i in range(p["num_hidden_layers"])
        ],  # fmt: skip
        "max_position_embeddings": p["max_position_embeddings"],
        "model_type": "gemma3_text",
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "pad_token_id": 0,
        "query_pre_attn_scalar": p["query_pre_attn_scalar"],
        "rms_norm_eps": 1e-6,
        "rope_local_base_freq": p["rope_local_base_freq"],
        "rope_scaling": None,
        "rope_theta": p["rope_theta"],
        "sliding_window": p["sliding_window"],
        "torch_dtype": "float32",
        "use_bidirectional_attention": False,
        "use_cache": True,
        "vocab_size": p["vocab_size"],
    }


def build_gemma3(out: Path, p: dict[str, Any]) -> None:
    build_causal_lm(
        out,
        p,
        cls_name="Gemma3ForCausalLM",
        classic_config=_gemma3_config(p),
        real_vocab=GPT2_VOCAB,
    )
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
