"""SmolLM3 builder (HuggingFaceTB/SmolLM3-3B conventions at toy size): the Llama decoder with
NoPE layers, saved by plain transformers-5 save_pretrained (config.json lists the
no_rope_layers that no_rope_layer_interval derives, and rope_parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import build_causal_lm
from .tokenizer import write_gpt2_tokenizer


def build_smollm3(out: Path, p: dict[str, Any]) -> None:
    build_causal_lm(out, p, cls_name="SmolLM3ForCausalLM", classic_config=None)
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
