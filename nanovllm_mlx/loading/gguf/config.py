"""An HF config.json equivalent from a GGUF file's metadata."""

from __future__ import annotations

from pathlib import Path

from nanovllm_mlx.loading.gguf.reader import metadata_value as _value

ARCHITECTURES = ("llama", "qwen2")


def config_from_metadata(metadata: dict, tensor_names: set[str], path: Path) -> dict:
    """An HF config.json equivalent for the llama and qwen2 architectures."""
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
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
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
    scaling = key("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": key("rope.scaling.factor"),
            "original_max_position_embeddings": key(
                "rope.scaling.original_context_length", config["max_position_embeddings"]
            ),
        }
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: unsupported GGUF rope scaling type {scaling!r}")
    return config
