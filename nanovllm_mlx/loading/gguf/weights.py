"""GGUF tensor names and layouts onto our models' parameters."""

from __future__ import annotations

import mlx.core as mx

from nanovllm_mlx.loading.gguf.linear_attention import is_linear_attention, map_linear_attention

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
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3's fused projection
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the experts' router
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Gemma 3 wraps both sub-blocks in two norms; llama.cpp's ffn_norm is its third.
_GEMMA3_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_NAMES = {"ffn_up": "mlp.gate_up_proj"}  # gate and up fused, gate first
_GPT_OSS_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "attn_sinks": "self_attn.sinks",
    "ffn_gate_inp": "mlp.router",
    # Newer converters may fuse the experts' gate and up (gate rows first): split below.
    "ffn_gate_up_exps": "mlp.experts.gate_up_proj",
}
# Qwen3.5 / Qwen3-Next (their Gated DeltaNet tensors: linear_attention.py).
_QWEN35_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_HYBRID = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
# Models whose q/k rows llama.cpp permutes (its Llama converter; Mixtral goes through it).
_PERMUTED = ("llama", "mistral", "mixtral")


def _unpermute(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (its rotary pairs are interleaved, HF's halves).

    Rows are output features for the weight, its scales and biases alike, so the same row
    shuffle applies to quantized triples without dequantizing."""
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _block_names(model_type: str) -> dict[str, str]:
    if model_type == "gemma3_text":
        return {**_BLOCK_NAMES, **_GEMMA3_NAMES}
    if model_type == "phi3":
        return {**_BLOCK_NAMES, **_PHI3_NAMES}
    if model_type == "gpt_oss":
        return {**_BLOCK_NAMES, **_GPT_OSS_NAMES}
    if model_type in _HYBRID:
        return {**_BLOCK_NAMES, **_QWEN35_NAMES}
    return _BLOCK_NAMES


def map_weights(weights: dict[str, mx.array], config: dict) -> tuple[dict[str, mx.array], dict]:
    """GGUF tensor names onto our models', with HF row order for llama's q and k; and the
    config entries some files store as tensors: Llama 3.1+'s RoPE frequency factors
    (rope_freqs), Phi-3's LongRoPE factors (rope_factors_short/long)."""
    out: dict[str, mx.array] = {}
    extra: dict = {}
    model_type = config["model_type"]
    names = _block_names(model_type)
    permuted = model_type in _PERMUTED
    linear: dict[tuple[int, str, str], mx.array] = {}
    for name, value in weights.items():
        if name == "rope_freqs.weight":
            extra["rope_freq_factors"] = value.astype(mx.float32).tolist()
            continue
        if name in ("rope_factors_short.weight", "rope_factors_long.weight"):
            kind = name.split("_")[2].split(".")[0]  # short or long
            extra[f"{kind}_factor"] = value.astype(mx.float32).tolist()
            continue
        stem, _, suffix = name.rpartition(".")  # suffix: weight, bias, scales or biases
        parts = stem.split(".")
        if model_type in _HYBRID and name.startswith("blk."):
            layer, kind = name.split(".")[1:3]  # ssm_a has no suffix
            if is_linear_attention(name, kind, model_type):
                linear[int(layer), kind, suffix] = value
                continue
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in names:
            target = f"layers.{parts[1]}.{names[parts[2]]}"
            if permuted and parts[2] == "attn_q":
                value = _unpermute(value, config["num_attention_heads"])
            elif permuted and parts[2] == "attn_k":
                value = _unpermute(value, config["num_key_value_heads"])
        elif stem in _GGUF_NAMES:
            target = _GGUF_NAMES[stem]
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r} for a {model_type} model")
        if target.endswith(".sinks"):  # a parameter of its own, not a layer's weight
            out[target] = value
        elif target.endswith(".experts.gate_up_proj"):
            gate, up = mx.split(value, 2, axis=1)
            stem = target.removesuffix(".gate_up_proj")
            out[f"{stem}.gate_proj.{suffix}"], out[f"{stem}.up_proj.{suffix}"] = gate, up
        else:
            out[f"{target}.{suffix}"] = value
    out.update(map_linear_attention(linear, config))
    if "short_factor" in extra or "long_factor" in extra:
        long = extra.pop("long_factor", None)
        short = extra.pop("short_factor", long)
        extra["rope_scaling"] = {
            "rope_type": "longrope",
            "short_factor": short,
            "long_factor": long or short,
            "original_max_position_embeddings": config.get("original_max_position_embeddings"),
        }
    return out, extra
