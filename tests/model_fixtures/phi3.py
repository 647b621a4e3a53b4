"""Phi-3 builder (Phi-3-mini-128k / Phi-4-mini conventions): fused qkv_proj and
gate_up_proj, LongRoPE short and long factors, partial rotary (Phi-4-mini's 3/4), a
sliding window on every layer (Phi-3-mini's 2047, scaled down), 4.x config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm, decoder_config_fields
from .tokenizer import EOT_ID, write_gpt2_tokenizer


def _factors(n: int, top: float) -> list[float]:
    # Rising like the real tables: high frequencies kept, low ones stretched.
    return [round(1.0 + (top - 1.0) * i / (n - 1), 4) for i in range(n)]


def _phi3_config(p: dict[str, Any]) -> dict[str, Any]:
    rotary = int(p["head_dim"] * p["partial_rotary_factor"])
    return {
        **decoder_config_fields(p),
        "architectures": ["Phi3ForCausalLM"],
        "embd_pdrop": 0.0,
        "eos_token_id": EOT_ID,
        "hidden_act": "silu",
        "model_type": "phi3",
        "original_max_position_embeddings": p["original_max_position_embeddings"],
        "pad_token_id": EOT_ID,
        "partial_rotary_factor": p["partial_rotary_factor"],
        "resid_pdrop": 0.0,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": _factors(rotary // 2, 1.5),
            "long_factor": _factors(rotary // 2, 8.0),
        },
        "sliding_window": p["sliding_window"],
    }


def build_phi3(out: Path, p: dict[str, Any]) -> None:
    build_causal_lm(out, p, cls_name="Phi3ForCausalLM", classic_config=_phi3_config(p))
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
