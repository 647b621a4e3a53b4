"""Tiny checkpoints written by mlx-lm itself: its own model classes, its quantizer and its
saver, so the layout is exactly what `mlx_lm.convert -q` publishes on mlx-community
(stacked `switch_mlp` experts, packed 4-bit weights with scales and biases, `quantization`
in config.json with per-layer entries where mlx-lm's predicate gives some layers other
bits), for every architecture the engine runs. Built in well under a second each, so
tests build them into their own temporary directories instead of the fixture cache.

mlx-lm's reference decode (`mlx_lm_greedy`) runs one prompt at a time through its own KV
cache, which is what the engine's batched run must reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import write_json
from .tokenizer import GPT2_VOCAB, write_gpt2_tokenizer

_DECODER = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": GPT2_VOCAB,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
_QWEN3 = {**_DECODER, "head_dim": 32, "tie_word_embeddings": True}
_MOE = {"num_experts_per_tok": 2, "intermediate_size": 64}

# model_type -> config.json as the Hub has it, tiny (mlx-lm reads the fields it knows).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_DECODER, "model_type": "llama"},
    "mistral": {**_DECODER, "model_type": "mistral"},
    "qwen2": {**_DECODER, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {**_QWEN3, "model_type": "qwen3"},
    "qwen3_moe": {
        **_QWEN3,
        "model_type": "qwen3_moe",
        "num_hidden_layers": 3,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    "mixtral": {**_DECODER, **_MOE, "model_type": "mixtral", "num_local_experts": 4},
    "granitemoe": {
        **_DECODER,
        **_MOE,
        "model_type": "granitemoe",
        "num_local_experts": 4,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "embedding_multiplier": 12.0,
        "attention_multiplier": 0.125,
        "residual_multiplier": 0.5,
        "logits_scaling": 2.0,
    },
    "gemma3_text": {
        **_DECODER,
        "model_type": "gemma3_text",
        "num_hidden_layers": 3,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 16,
        "sliding_window_pattern": 3,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "phi3": {**_DECODER, "model_type": "phi3", "num_key_value_heads": 4},
    "smollm3": {
        **_DECODER,
        "model_type": "smollm3",
        "num_hidden_layers": 4,
        "no_rope_layer_interval": 2,
        "tie_word_embeddings": True,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 128,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 512,
        "n_ctx": 512,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": GPT2_VOCAB,
    },
}


def multimodal_gemma3_config() -> dict[str, Any]:
    """Gemma 3 4B+'s multimodal config: the text model's fields under text_config."""
    text = {**CONFIGS["gemma3_text"]}
    return {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32},
        "vocab_size": text["vocab_size"],
    }


def build_mlx_lm(
    out: Path,
    config: dict[str, Any],
    *,
    bits: int | None = 4,
    group_size: int = 64,
    mode: str = "affine",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """mlx-lm's Model for config with random weights (norms too, so a norm convention such
    as Gemma's 1 + w shows), quantized by mlx_lm.utils.quantize_model (bits None: float),
    saved by mlx_lm.utils.save_model / save_config, with GPT-2's tokenizer. extra: more
    tensors written into the shard (a vision tower a real multimodal repo carries)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    # A Gemma 3 checkpoint converted from the Hub has no head (tied): mlx-lm's sanitize
    # drops the one its module starts with, as its conversion does.
    text_model = getattr(model, "language_model", model)
    if config["model_type"].startswith("gemma3"):
        text_model.sanitize({})
    params = nn.utils.tree_flatten(model.parameters())
    model.update(
        nn.utils.tree_unflatten(
            [
                (k, v + mx.random.uniform(-0.3, 0.3, v.shape))
                if "norm" in k or "ln_" in k
                else (k, mx.random.normal(v.shape) * 0.08)
                for k, v in params
            ]
        )
    )
    saved = dict(config)
    if bits is not None:
        model, saved = quantize_model(model, saved, group_size, bits, mode=mode)
    mx.eval(model.parameters())
    save_model(out, model)
    if extra:
        file = out / "model.safetensors"
        tensors = {**mx.load(str(file)), **extra}
        mx.save_safetensors(str(file), tensors, metadata={"format": "mlx"})
    save_config(saved, out / "config.json")
    write_json(out / "generation_config.json", {"eos_token_id": GPT2_VOCAB - 1})
    write_gpt2_tokenizer(out, 512)


def mlx_lm_greedy(path: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """mlx-lm's own load and greedy decode, one prompt at a time, in float32 like the
    engine on CPU (float16 scales, as mlx-community has them, made its CPU decode of the
    qwen3-moe-q4-tiny fixture take 79 s)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.update(
        nn.utils.tree_map(
            lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )
    out = []
    for prompt in prompts:
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompt]), cache=cache)[0, -1]
        tokens: list[int] = []
        for _ in range(steps):
            token = int(mx.argmax(logits).item())
            tokens.append(token)
            logits = model(mx.array([[token]]), cache=cache)[0, -1]
        out.append(tokens)
    return out
