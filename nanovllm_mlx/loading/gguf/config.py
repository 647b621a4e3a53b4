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
    "qwen35": "qwen3_5_text",
    "qwen35moe": "qwen3_5_moe_text",
    "qwen3next": "qwen3_next",
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
        # A MoE's converter may write only the experts' width.
        and not (k == "feed_forward_length" and f"{arch}.expert_feed_forward_length" in metadata)
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
        "intermediate_size": key("feed_forward_length", key("expert_feed_forward_length")),
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
    elif arch in ("qwen35", "qwen35moe", "qwen3next"):
        config.update(_hybrid(arch, key, config, tensor_names, path))
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


def _hybrid(arch: str, key, config: dict, tensor_names: set[str], path: Path) -> dict:
    """Qwen3.5 / Qwen3-Next: the Gated DeltaNet sizes from llama.cpp's ssm.* keys (state
    size = key head dim, group count = key heads, time-step rank = value heads, inner
    size = value heads x value head dim), every full_attention_interval-th layer full
    attention, rotary on rope.dimension_count of each head."""
    ssm = ("ssm.conv_kernel", "ssm.state_size", "ssm.group_count", "ssm.time_step_rank",
           "ssm.inner_size", "full_attention_interval")  # fmt: skip
    missing = [f"{arch}.{k}" for k in ssm if key(k) is None]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    layers, every, v_heads = (
        config["num_hidden_layers"],
        key("full_attention_interval"),
        key("ssm.time_step_rank"),
    )
    out = {
        "linear_conv_kernel_dim": key("ssm.conv_kernel"),
        "linear_key_head_dim": key("ssm.state_size"),
        "linear_num_key_heads": key("ssm.group_count"),
        "linear_num_value_heads": v_heads,
        "linear_value_head_dim": key("ssm.inner_size") // v_heads,
        "layer_types": [
            "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)
        ],
        "partial_rotary_factor": key("rope.dimension_count", config["head_dim"] // 4)
        / config["head_dim"],
    }
    if arch != "qwen35":
        out.update(
            num_experts=key("expert_count", 0),
            num_experts_per_tok=key("expert_used_count", 0),
            moe_intermediate_size=key("expert_feed_forward_length"),
            shared_expert_intermediate_size=key("expert_shared_feed_forward_length"),
            norm_topk_prob=True,  # llama.cpp renormalizes the top-k weights of both
            # A layer without a router is a dense one (Qwen3-Next's mlp_only_layers).
            mlp_only_layers=[
                i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names
            ],
        )
    return out


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
