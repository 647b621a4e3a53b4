"""An HF config.json equivalent from a GGUF file's metadata."""

from __future__ import annotations

from pathlib import Path

from nanovllm_mlx.loading.gguf.reader import metadata_value as _value

# general.architecture -> the HF model_type it loads as (llama with experts is Mixtral).
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt-oss": "gpt_oss",
}


def config_from_metadata(metadata: dict, tensor_names: set[str], path: Path) -> dict:
    """An HF config.json equivalent for the architectures in ARCHITECTURES."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )

    def key(name: str, default: object = None) -> object:
        return _value(metadata.get(f"{arch}.{name}", default))

    missing = [
        f"{arch}.{k}"
        for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
        if f"{arch}.{k}" not in metadata
    ]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    vocab = key("vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else None
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata gives no vocabulary size")
    head_dim = key("attention.key_length", hidden // heads)
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "intermediate_size": key("feed_forward_length"),
        "vocab_size": vocab,
        "max_position_embeddings": key("context_length", 2048),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        # llama.cpp's converter writes output.weight only when the head is not tied.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": arch == "llama" and "blk.0.attn_output.bias" in tensor_names,
        "bos_token_id": _value(metadata.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _value(metadata.get("tokenizer.ggml.eos_token_id")),
    }
    experts, used = key("expert_count", 0), key("expert_used_count", 0)
    if arch == "llama" and experts:
        config.update(model_type="mixtral", num_local_experts=experts, num_experts_per_tok=used)
    elif arch == "qwen3moe":
        # llama.cpp renormalizes the top-k weights of every Qwen3-MoE (norm_topk_prob).
        # A layer without a router is a dense one (mlp_only_layers).
        dense = [
            i
            for i in range(config["num_hidden_layers"])
            if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names
        ]
        config.update(
            num_experts=experts,
            num_experts_per_tok=used,
            moe_intermediate_size=key("expert_feed_forward_length"),
            norm_topk_prob=True,
            mlp_only_layers=dense,
        )
    elif arch == "gemma3":
        layers = config["num_hidden_layers"]
        config.update(
            sliding_window=key("attention.sliding_window", 4096),
            # Five sliding layers to a global one unless the file says otherwise.
            sliding_window_pattern=key("attention.sliding_window_pattern", 6),
            # llama.cpp's rule: 27B (62 layers) scales queries by hidden / heads, the
            # others by head_dim; the file does not say.
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
            torch_dtype="bfloat16",  # Gemma overflows float16 activations
        )
    elif arch == "gpt-oss":
        # llama.cpp's gpt-oss: sliding layers first, then alternating (the HF default), and
        # swiglu alpha/limit fixed at the model's 1.702 / 7.0 (ModelArgs' defaults).
        config.update(
            num_local_experts=experts,
            num_experts_per_tok=used,
            intermediate_size=key("expert_feed_forward_length", config["intermediate_size"]),
            sliding_window=key("attention.sliding_window", 128),
            attention_bias=True,
        )
    elif arch == "phi3":
        rotary = key("rope.dimension_count", head_dim)
        config.update(
            partial_rotary_factor=rotary / head_dim,
            sliding_window=key("attention.sliding_window"),
            original_max_position_embeddings=key(
                "rope.scaling.original_context_length", config["max_position_embeddings"]
            ),
        )
    config.update(_rope_scaling(arch, key, config, path))
    return config


def _rope_scaling(arch: str, key, config: dict, path: Path) -> dict:
    scaling = key("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope = {
            "rope_type": scaling,
            "factor": key("rope.scaling.factor"),
            "original_max_position_embeddings": key(
                "rope.scaling.original_context_length", config["max_position_embeddings"]
            ),
        }
        if arch == "gpt-oss":
            # The file does not say; the model's own config has truncate false.
            rope.update(beta_fast=32.0, beta_slow=1.0, truncate=False)
        return {"rope_scaling": rope}
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: unsupported GGUF rope scaling type {scaling!r}")
    return {}
