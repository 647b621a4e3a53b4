"""A multimodal checkpoint whose text model the engine serves: Llava (a CLIP vision tower
and projector around a Llama decoder), saved by transformers 5 in the Hub layout
(language_model.model.*, language_model.lm_head, vision_tower.*, multi_modal_projector.*,
the decoder's fields under text_config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import scratch_owner
from .tokenizer import EOT_ID, GPT2_VOCAB, write_gpt2_tokenizer
from .weights import (
    assert_loads_identically,
    check_greedy_robust,
    probe_ids,
    randomize_,
    torch_rng_isolated,
)


def build_llava(out: Path, p: dict[str, Any]) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=p["text_config"],
        vision_config=p["vision_config"],
        image_token_index=p["image_token_index"],
        tie_word_embeddings=p["tie_word_embeddings"],
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
    )
    with torch_rng_isolated():
        model = LlavaForConditionalGeneration(config)
    randomize_(model, p["seed"])
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    ids = probe_ids(GPT2_VOCAB)
    name = scratch_owner(out.name)
    check_greedy_robust(name, model, ids)
    assert_loads_identically(name, LlavaForConditionalGeneration, out, model, ids)
    write_gpt2_tokenizer(out, p["text_config"]["max_position_embeddings"])
