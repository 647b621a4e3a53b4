"""Checkpoints in the layout mlx-community publishes (what `mlx_lm.convert -q` writes),
built with MLX alone: random 4-bit weights in real shapes, for benchmarks at the sizes
users run (an 8B model in seconds, on any backend, without torch): Llama, and Qwen3-MoE
with its experts stacked under `switch_mlp` (Qwen3-30B-A3B-4bit's layout).

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


def _quantized(
    rows: int,
    cols: int,
    p: dict[str, Any],
    real_rows: int,
    experts: tuple[int, ...] = (),
    bits: int | None = None,
) -> dict[str, Any]:
    """A [*experts, rows, cols] matrix in 4-bit (or `bits`) affine form."""
    import mlx.core as mx

    bits, group = bits or p["bits"], p["group_size"]
    levels = 2**bits
    # Uniform levels 0..L-1 have standard deviation sqrt((L^2 - 1) / 12).
    step = 0.02 / ((levels**2 - 1) / 12) ** 0.5
    scales = mx.random.uniform(0.8, 1.2, (*experts, rows, cols // group)) * step
    scales = scales.astype(mx.float16)
    if real_rows < rows:
        scales[..., real_rows:, :] = 0
    shape = (*experts, rows, cols * bits // 32)
    high, low = (mx.random.randint(0, 2**16, shape, dtype=mx.uint32) for _ in range(2))
    return {
        "weight": high * 2**16 + low,
        "scales": scales,
        "biases": (scales * -(levels - 1) / 2).astype(mx.float16),
    }


class _Shards:
    """Tensors in the order added, split into mlx-lm's numbered shards with their index."""

    def __init__(self) -> None:
        self.shards: list[dict[str, Any]] = [{}]
        self.size = 0

    def add(self, name: str, value: Any) -> None:
        import mlx.core as mx

        if self.size + value.nbytes > SHARD_BYTES and self.shards[-1]:
            self.shards.append({})
            self.size = 0
        mx.eval(value)
        self.shards[-1][name] = value
        self.size += value.nbytes

    def write(self, out: Path) -> None:
        import mlx.core as mx

        n = len(self.shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(self.shards, start=1):
            file = f"model-{i:05d}-of-{n:05d}.safetensors"
            mx.save_safetensors(str(out / file), shard, metadata={"format": "mlx"})
            for name, value in shard.items():
                weight_map[name] = file
                total += value.nbytes
        write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )


def _finish(out: Path, shards: _Shards, config: dict[str, Any], p: dict[str, Any]) -> None:
    shards.write(out)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    write_gpt2_tokenizer(out, p["max_position_embeddings"])


def build_llama_quantized(out: Path, p: dict[str, Any]) -> None:
    """A Llama checkpoint in mlx-community's quantized layout (see the module docstring)."""
    import mlx.core as mx

    mx.random.seed(p["seed"])
    shards = _Shards()
    real_vocab = min(p["vocab_size"], GPT2_VOCAB)
    for name, rows, cols in _linear_shapes(p):
        head = name in ("lm_head", "model.embed_tokens")
        for part, value in _quantized(rows, cols, p, real_vocab if head else rows).items():
            shards.add(f"{name}.{part}", value)
    ones = mx.ones((p["hidden_size"],), dtype=mx.float16)
    for i in range(p["num_hidden_layers"]):
        shards.add(f"model.layers.{i}.input_layernorm.weight", ones)
        shards.add(f"model.layers.{i}.post_attention_layernorm.weight", ones)
    shards.add("model.norm.weight", ones)
    _finish(out, shards, _llama_config(p), p)


# mlx-lm's Qwen3-MoE quant_predicate: the router keeps 8 bits next to 4-bit experts,
# recorded per layer in config.json's quantization entry.
ROUTER_BITS = 8
_QWEN3_MOE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
)


def _qwen3_moe_config(p: dict[str, Any]) -> dict[str, Any]:
    """Qwen/Qwen3-30B-A3B's config.json fields as mlx-lm saves them, with the
    quantization entry (and its per-layer router entries) twice, as mlx-lm writes it."""
    quant: dict[str, Any] = {"group_size": p["group_size"], "bits": p["bits"], "mode": "affine"}
    for i in range(p["num_hidden_layers"]):
        quant[f"model.layers.{i}.mlp.gate"] = {"group_size": p["group_size"], "bits": ROUTER_BITS}
    return {
        **{k: p[k] for k in _QWEN3_MOE_FIELDS},
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "hidden_act": "silu",
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "torch_dtype": "bfloat16",
        "quantization": quant,
        "quantization_config": quant,
    }


def build_qwen3_moe_quantized(out: Path, p: dict[str, Any]) -> None:
    """Qwen3-MoE in mlx-community's layout (mlx-community/Qwen3-30B-A3B-4bit's): every
    layer sparse, each projection's experts stacked under mlp.switch_mlp as one [E, out,
    in] packed 4-bit tensor, the router (mlp.gate) at 8 bits, per-head q/k norms."""
    import mlx.core as mx

    mx.random.seed(p["seed"])
    shards = _Shards()
    h, hd, inter = p["hidden_size"], p["head_dim"], p["moe_intermediate_size"]
    nh, nkv, experts = p["num_attention_heads"], p["num_key_value_heads"], p["num_experts"]
    real_vocab = min(p["vocab_size"], GPT2_VOCAB)

    def linear(name: str, rows: int, cols: int, **kw: Any) -> None:
        real = real_vocab if name in ("lm_head", "model.embed_tokens") else rows
        for part, value in _quantized(rows, cols, p, real, **kw).items():
            shards.add(f"{name}.{part}", value)

    ones = mx.ones((h,), dtype=mx.float16)
    head_ones = mx.ones((hd,), dtype=mx.float16)
    linear("model.embed_tokens", p["vocab_size"], h)
    for i in range(p["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        linear(f"{pre}.self_attn.q_proj", nh * hd, h)
        linear(f"{pre}.self_attn.k_proj", nkv * hd, h)
        linear(f"{pre}.self_attn.v_proj", nkv * hd, h)
        linear(f"{pre}.self_attn.o_proj", h, nh * hd)
        shards.add(f"{pre}.self_attn.q_norm.weight", head_ones)
        shards.add(f"{pre}.self_attn.k_norm.weight", head_ones)
        linear(f"{pre}.mlp.gate", experts, h, bits=ROUTER_BITS)
        linear(f"{pre}.mlp.switch_mlp.gate_proj", inter, h, experts=(experts,))
        linear(f"{pre}.mlp.switch_mlp.up_proj", inter, h, experts=(experts,))
        linear(f"{pre}.mlp.switch_mlp.down_proj", h, inter, experts=(experts,))
        shards.add(f"{pre}.input_layernorm.weight", ones)
        shards.add(f"{pre}.post_attention_layernorm.weight", ones)
    shards.add("model.norm.weight", ones)
    if not p["tie_word_embeddings"]:
        linear("lm_head", p["vocab_size"], h)
    _finish(out, shards, _qwen3_moe_config(p), p)
