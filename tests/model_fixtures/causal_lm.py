"""The builder shared by every transformers ``*ForCausalLM`` architecture: a random model,
saved the way the Hub has it, and proved to reload into the very same model.

An architecture module (llama.py, qwen2.py) adds its config.json field set and tokenizer
and calls :func:`build_causal_lm`; GPT-2 has its own, because its Hub file predates
save_pretrained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import scratch_owner, write_json
from .tokenizer import EOT_ID, GPT2_VOCAB
from .weights import (
    assert_loads_identically,
    check_greedy_robust,
    probe_ids,
    randomize_,
    torch_rng_isolated,
    zero_vocab_padding_,
)

# Recipe parameters that are not config fields.
NON_CONFIG_PARAMS = ("seed", "transformers")


def decoder_config_fields(p: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields that Llama-family Hub checkpoints (Llama, Qwen2, ...) have in
    common, in transformers 4.x style; an architecture adds its own fields to these."""
    return {
        "attention_dropout": 0.0,
        "bos_token_id": EOT_ID,
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_theta": p["rope_theta"],
        "tie_word_embeddings": p["tie_word_embeddings"],
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": p["vocab_size"],
    }


def build_causal_lm(
    out: Path,
    p: dict[str, Any],
    *,
    cls_name: str,
    classic_config: dict[str, Any] | None,
    generation_config: dict[str, Any] | None = None,
    real_vocab: int = GPT2_VOCAB,
    tweak: Callable[[Any], None] | None = None,
) -> None:
    """Random model -> save_pretrained; optionally swap config.json for the 4.x Hub style and
    prove transformers reads that back into the very same model.

    classic_config None: the config is built from the recipe parameters and written as the
    installed transformers writes it. real_vocab below p["vocab_size"]: the padding rows are
    zeroed, so a random model never argmaxes into them. tweak: called on the randomized
    model before it is saved (buffers randomize_ does not touch, parameters whose useful
    range the generic scales miss, such as a linear-attention layer's decay rates).
    """
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, cls_name)
    if classic_config is not None:
        write_json(out / "config.json", classic_config)
        config = AutoConfig.from_pretrained(out)
    else:
        config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
        kwargs = {k: v for k, v in p.items() if k not in NON_CONFIG_PARAMS}
        config = config_cls(**kwargs, bos_token_id=EOT_ID, eos_token_id=EOT_ID)
    with torch_rng_isolated():
        model = cls(config)
    randomize_(model, p["seed"])
    if tweak is not None:
        tweak(model)
    if p["vocab_size"] > real_vocab:
        zero_vocab_padding_(model, real_vocab)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    if classic_config is not None:
        write_json(out / "config.json", classic_config)
    if generation_config is not None:
        write_json(out / "generation_config.json", generation_config)

    # Long enough that llama3's rescaled low frequencies change the logits measurably.
    ids = probe_ids(real_vocab, length=300 if p.get("rope_scaling") else 24)
    name = scratch_owner(out.name)
    check_greedy_robust(name, model, ids)
    assert_loads_identically(name, cls, out, model, ids)
