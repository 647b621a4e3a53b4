"""Checkpoints in the layout mlx-community publishes (what `mlx_lm.convert -q` writes),
built with MLX alone: random 4-bit weights in real shapes, for benchmarks at the sizes
users run (an 8B model in seconds, on any backend, without torch).

The layout: sharded `model-0000i-of-0000n.safetensors` plus their index, every linear
layer and the embedding stored as packed uint32 `weight` with per-group `scales` and
`biases`, norms in float16, and the config's `quantization` entry (mlx-lm writes it twice,
as `quantization` and `quantization_config`).

Random packed bits dequantize to values uniform on 16 levels; the scales are chosen so
that each weight's spread matches the usual 0.02 initialisation, which keeps 32 layers of
float16 activations finite. The head's rows past the tokenizer's vocabulary are zero (its
scales and biases), so a random model never argmaxes into ids it cannot detokenize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import write_json
from .llama import llama_classic_config
from .tokenizer import EOT_ID, GPT2_VOCAB, write_gpt2_tokenizer

SHARD_BYTES = 2 * 2**30  # mlx-lm shards at 5 GB; smaller here so an 8B model has several


def _llama_config(p: dict[str, Any]) -> dict[str, Any]:
    quant = {"group_size": p["group_size"], "bits": p["bits"]}
    return {
        **llama_classic_config(p),
        "torch_dtype": "float16",
        "quantization": quant,
        "quantization_config": quant,
    }


def _linear_shapes(p: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, out, in) of every quantized matrix, in checkpoint order."""
    h, hd, inter = p["hidden_size"], p["head_dim"], p["intermediate_size"]
    nh, nkv = p["num_attention_heads"], p["num_key_value_heads"]
    shapes = [("model.embed_tokens", p["vocab_size"], h)]
    for i in range(p["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        shapes += [
            (f"{pre}.self_attn.q_proj", nh * hd, h),
            (f"{pre}.self_attn.k_proj", nkv * hd, h),
            (f"{pre}.self_attn.v_proj", nkv * hd, h),
            (f"{pre}.self_attn.o_proj", h, nh * hd),
            (f"{pre}.mlp.gate_proj", inter, h),
            (f"{pre}.mlp.up_proj", inter, h),
            (f"{pre}.mlp.down_proj", h, inter),
        ]
    if not p["tie_word_embeddings"]:
        shapes.append(("lm_head", p["vocab_size"], h))
    return shapes


def _quantized(rows: int, cols: int, p: dict[str, Any], real_rows: int) -> dict[str, Any]:
    import mlx.core as mx

    bits, group = p["bits"], p["group_size"]
    levels = 2**bits
    # Uniform levels 0..L-1 have standard deviation sqrt((L^2 - 1) / 12).
    step = 0.02 / ((levels**2 - 1) / 12) ** 0.5
    scales = (mx.random.uniform(0.8, 1.2, (rows, cols // group)) * step).astype(mx.float16)
    if real_rows < rows:
        scales[real_rows:] = 0
    shape = (rows, cols * bits // 32)
    high, low = (mx.random.randint(0, 2**16, shape, dtype=mx.uint32) for _ in range(2))
    return {
        "weight": high * 2**16 + low,
        "scales": scales,
        "biases": (scales * -(levels - 1) / 2).astype(mx.float16),
    }


def build_llama_quantized(out: Path, p: dict[str, Any]) -> None:
    """A Llama checkpoint in mlx-community's quantized layout (see the module docstring)."""
    import mlx.core as mx

    mx.random.seed(p["seed"])
    shards: list[dict[str, Any]] = [{}]
    size = 0

    def add(name: str, value: Any) -> None:
        nonlocal size
        if size + value.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        mx.eval(value)
        shards[-1][name] = value
        size += value.nbytes

    real_vocab = min(p["vocab_size"], GPT2_VOCAB)
    for name, rows, cols in _linear_shapes(p):
        head = name in ("lm_head", "model.embed_tokens")
        for part, value in _quantized(rows, cols, p, real_vocab if head else rows).items():
            add(f"{name}.{part}", value)
    ones = mx.ones((p["hidden_size"],), dtype=mx.float16)
    for i in range(p["num_hidden_layers"]):
        add(f"model.layers.{i}.input_layernorm.weight", ones)
        add(f"model.layers.{i}.post_attention_layernorm.weight", ones)
    add("model.norm.weight", ones)

    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(out / file), shard, metadata={"format": "mlx"})
        for name, value in shard.items():
            weight_map[name] = file
            total += value.nbytes
    write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    write_json(out / "config.json", _llama_config(p))
    write_json(out / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
