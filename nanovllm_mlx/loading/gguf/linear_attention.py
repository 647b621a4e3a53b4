"""llama.cpp's Gated DeltaNet tensors (Qwen3.5 `qwen35`/`qwen35moe`, Qwen3-Next
`qwen3next`) onto our qwen3_5 model's linear_attn parameters.

What llama.cpp's converter (Qwen3NextModel.modify_tensors and, for Qwen3.5 dense and
MoE, _LinearAttentionVReorderBase; not shipped with gguf-py, so taken from descriptions of
its source: no real file was run here) does to them, undone here:
- A_log is stored as ssm_a = -exp(A_log) (no .weight suffix); dt_bias as ssm_dt.bias.
- conv1d's [C, 1, K] weight is squeezed to [C, K]; ours is MLX's [C, K, 1].
- Qwen3.5 only: where value heads outnumber key heads, the value heads are reordered from
  grouped by key head (k0: v0..v(r-1), k1: ...) to tiled (v0 of every key head, then v1 ...)
  so ggml's broadcasting repeat pairs them; that touches in_proj_qkv's v rows, in_proj_z,
  in_proj_b/a, A_log, dt_bias, conv1d's v channels and out_proj's columns.
- Qwen3-Next keeps its fused in_proj_qkvz / in_proj_ba (ssm_in / ssm_ba), split as its
  safetensors are.
The norms around these layers are stored as 1 + w, which is our folded layout already.
"""

from __future__ import annotations

import mlx.core as mx

from nanovllm_mlx.models.gated_delta import split_qwen3_next

_NAMES = {
    "attn_qkv": "in_proj_qkv",
    "attn_gate": "in_proj_z",
    "ssm_beta": "in_proj_b",
    "ssm_alpha": "in_proj_a",
    "ssm_conv1d": "conv1d",
    "ssm_norm": "norm",
    "ssm_out": "out_proj",
    "ssm_in": "in_proj_qkvz",
    "ssm_ba": "in_proj_ba",
}
# Qwen3-Next files from converters that split its projections are not read: which order
# their value heads are in is unverified, so they fail by name instead of decoding wrongly.
_NOT_QWEN3_NEXT = ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha")


def is_linear_attention(name: str, kind: str, model_type: str) -> bool:
    """Whether GGUF tensor `name` (of block tensor `kind`) belongs to a Gated DeltaNet layer."""
    if model_type == "qwen3_next" and kind in _NOT_QWEN3_NEXT:
        raise ValueError(
            f"unexpected GGUF tensor {name!r} for a qwen3_next model: only files with the "
            "fused ssm_in / ssm_ba projections are supported (convert with those)"
        )
    return kind in _NAMES or kind in ("ssm_a", "ssm_dt")


def _grouped(x: mx.array, axis: int, hk: int) -> mx.array:
    """Value heads along `axis` from llama.cpp's tiled order back to grouped by key head;
    works on quantized weights, scales and biases alike (whole heads move)."""
    x = x.moveaxis(axis, 0)
    shape = x.shape
    r = shape[0] // hk
    x = x.reshape(r, hk, -1).swapaxes(0, 1).reshape(shape)
    return x.moveaxis(0, axis)


def map_linear_attention(
    tensors: dict[tuple[int, str, str], mx.array], config: dict
) -> dict[str, mx.array]:
    """{(layer, gguf kind, suffix): tensor} -> our names under layers.N.linear_attn."""
    if not tensors:  # not a hybrid model
        return {}
    hk = config["linear_num_key_heads"]
    key_dim = hk * config["linear_key_head_dim"]
    tiled = config["model_type"] != "qwen3_next" and config["linear_num_value_heads"] > hk
    out: dict[str, mx.array] = {}
    fused: dict[int, dict[str, mx.array]] = {}
    for (layer, kind, suffix), value in tensors.items():
        prefix = f"layers.{layer}.linear_attn"
        if kind == "ssm_a":
            value, name = mx.log(-value.astype(mx.float32)), "A_log"
        elif kind == "ssm_dt":
            name = "dt_bias"
        elif kind == "ssm_conv1d":
            value, name = value[:, :, None], "conv1d.weight"
        else:
            name = f"{_NAMES[kind]}.{suffix}"
        if tiled and kind in ("attn_gate", "ssm_beta", "ssm_alpha", "ssm_a", "ssm_dt"):
            value = _grouped(value, 0, hk)
        elif tiled and kind in ("attn_qkv", "ssm_conv1d"):
            qk, v = value[: key_dim * 2], value[key_dim * 2 :]
            value = mx.concatenate([qk, _grouped(v, 0, hk)], axis=0)
        elif tiled and kind == "ssm_out":
            value = _grouped(value, 1, hk)
        if kind in ("ssm_in", "ssm_ba"):
            fused.setdefault(layer, {})[f"{prefix}.{name}"] = value
        else:
            out[f"{prefix}.{name}"] = value
    for layer, parts in fused.items():
        dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
        hv = config["linear_num_value_heads"]
        out.update(split_qwen3_next(parts, f"layers.{layer}.linear_attn", hk, dk, dv, hv))
    return out
