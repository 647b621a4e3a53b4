"""gpt-oss builders (openai/gpt-oss-20b conventions at toy size): attention sinks,
alternating sliding/full layers, biased experts with the clamped SwiGLU, a biased router,
YaRN. Two layouts of the same weights:

- ``gpt-oss-tiny``: what transformers 5 saves (experts fused and float, [in, out], config
  with rope_parameters);
- ``gpt-oss-tiny-mxfp4``: OpenAI's Hub layout, experts as MXFP4 ``*_blocks``/``*_scales``
  and a 4.x config with ``quantization_config``.

The experts' weights are rounded to MXFP4 values before either is saved, so both hold
exactly the same numbers and transformers' float model is the reference for both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .common import scratch_owner, write_json
from .tokenizer import EOT_ID, GPT2_VOCAB, write_gpt2_tokenizer
from .weights import (
    MATRIX_GAIN,
    OUT_PROJ_GAIN,
    _generator,
    assert_loads_identically,
    check_greedy_robust,
    probe_ids,
    randomize_,
    save_safetensors,
    torch_rng_isolated,
)

if TYPE_CHECKING:
    import torch

# E2M1 magnitudes by code (the sign is bit 3): the values an MXFP4 element can take.
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
SINK_STD = 1.5  # wide enough that some heads put much of their weight on the sink


def _config(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "head_dim": p["head_dim"],
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "num_local_experts": p["num_local_experts"],
        "num_experts_per_tok": p["num_experts_per_tok"],
        "sliding_window": p["sliding_window"],
        "swiglu_limit": p["swiglu_limit"],
        "vocab_size": p["vocab_size"],
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def _hub_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of openai/gpt-oss-20b's config.json (4.x style).
    return {
        **_config(p),
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": EOT_ID,
        "experts_per_token": p["num_experts_per_tok"],
        "hidden_act": "silu",
        "initial_context_length": p["rope_scaling"]["original_max_position_embeddings"],
        "initializer_range": 0.02,
        "layer_types": _layer_types(p),
        "model_type": "gpt_oss",
        "output_router_logits": False,
        "pad_token_id": EOT_ID,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rope_scaling": p["rope_scaling"],
        "rope_theta": p["rope_theta"],
        "router_aux_loss_coef": 0.9,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _layer_types(p: dict[str, Any]) -> list[str]:
    return [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(p["num_hidden_layers"])
    ]


def mxfp4_encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., out, in] float -> (blocks [..., out, in / 32, 16] uint8, two codes a byte, low
    nibble first; scales [..., out, in / 32] uint8, exponent + 127): the Hub's packing.
    Each group's scale puts its largest magnitude in [4, 8), so it rounds to at most 6."""
    *lead, n_in = w.shape
    groups = w.reshape(*lead, n_in // 32, 32).astype(np.float32)
    peak = np.abs(groups).max(-1, keepdims=True)
    exp = np.where(peak > 0, np.floor(np.log2(np.maximum(peak, 1e-30))) - 2, 0).astype(np.int32)
    scaled = np.abs(groups) / np.exp2(exp)
    codes = np.abs(scaled[..., None] - FP4).argmin(-1).astype(np.uint8)
    codes |= np.where(groups < 0, 8, 0).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp[..., 0] + 127).astype(np.uint8)


def mxfp4_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)
    values = FP4[codes & 7] * np.where(codes & 8, -1.0, 1.0).astype(np.float32)
    out = values * np.exp2(scales.astype(np.int32) - 127)[..., None].astype(np.float32)
    return out.reshape(*scales.shape[:-1], -1)


def _randomize_gpt_oss_(model: Any, seed: int) -> None:
    """randomize_ takes a 3-D parameter as [experts, out, in]; gpt-oss's are [in, out], so
    its experts are drawn again with the right fan-in, then rounded to MXFP4 values; the
    sinks get a spread that makes them matter."""
    import torch

    randomize_(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                gain = OUT_PROJ_GAIN if name.endswith("down_proj") else MATRIX_GAIN
                noise = torch.randn(p.shape, generator=_generator(seed, name))
                w = (noise * (gain / math.sqrt(p.shape[-2]))).transpose(-1, -2).numpy()
                exact = mxfp4_decode(*mxfp4_encode(w))
                p.copy_(torch.from_numpy(exact).transpose(-1, -2))
            elif name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape, generator=_generator(seed, name)) * SINK_STD)


def _model(p: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        **_config(p),
        layer_types=_layer_types(p),
        rope_parameters={**p["rope_scaling"], "rope_theta": p["rope_theta"]},
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
    )
    with torch_rng_isolated():
        model = GptOssForCausalLM(config)
    _randomize_gpt_oss_(model, p["seed"])
    return model.eval(), GptOssForCausalLM


def _hub_tensors(model: Any) -> dict[str, torch.Tensor]:
    import torch

    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_encode(t.transpose(-1, -2).numpy())
            out[f"{name}_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
            out[f"{name}_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
        else:
            out[name] = t.contiguous()
    return out


def build_gpt_oss(out: Path, p: dict[str, Any]) -> None:
    """transformers 5's layout, as save_pretrained writes it."""
    model, cls = _model(p)
    model.save_pretrained(out, safe_serialization=True)
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
    ids = probe_ids(GPT2_VOCAB, length=80)  # past the sliding window
    name = scratch_owner(out.name)
    check_greedy_robust(name, model, ids)
    assert_loads_identically(name, cls, out, model, ids)


def build_gpt_oss_mxfp4(out: Path, p: dict[str, Any]) -> None:
    """OpenAI's Hub layout: MXFP4 experts (blocks and scales), everything else float."""
    model, _ = _model(p)
    tensors = _hub_tensors(model)
    # The packing round-trips: what is saved decodes to the model's very weights.
    for name, t in model.state_dict().items():
        if name.endswith("experts.down_proj"):
            decoded = mxfp4_decode(
                tensors[f"{name}_blocks"].numpy(), tensors[f"{name}_scales"].numpy()
            )
            assert np.array_equal(decoded, t.transpose(-1, -2).numpy()), name
    save_safetensors(out / "model.safetensors", tensors)
    write_json(out / "config.json", _hub_config(p))
    write_json(out / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
