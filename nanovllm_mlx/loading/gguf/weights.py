"""GGUF tensor names and layouts onto models/llama.py's parameters."""

from __future__ import annotations

import mlx.core as mx

_GGUF_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (its rotary pairs are interleaved, HF's halves).

    Rows are output features for the weight, its scales and biases alike, so the same row
    shuffle applies to quantized triples without dequantizing."""
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def map_weights(
    weights: dict[str, mx.array], config: dict
) -> tuple[dict[str, mx.array], list[float] | None]:
    """GGUF tensor names onto models/llama.py's, with HF row order for llama's q and k; and
    the RoPE frequency factors, which Llama 3.1+ files store as a tensor (rope_freqs)."""
    out: dict[str, mx.array] = {}
    freq_factors = None
    permuted = config["model_type"] == "llama"
    for name, value in weights.items():
        if name == "rope_freqs.weight":
            freq_factors = value.astype(mx.float32).tolist()
            continue
        stem, _, suffix = name.rpartition(".")  # suffix: weight, bias, scales or biases
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
            target = f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
            if permuted and parts[2] == "attn_q":
                value = _unpermute(value, config["num_attention_heads"])
            elif permuted and parts[2] == "attn_k":
                value = _unpermute(value, config["num_key_value_heads"])
        elif stem in _GGUF_NAMES:
            target = _GGUF_NAMES[stem]
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r} for a {config['model_type']} model")
        out[f"{target}.{suffix}"] = value
    return out, freq_factors
