"""Every fixture by name: its builder, its parameters, and the stamp whose hash decides
when a cached directory is stale.

Adding an architecture: a builder module next to llama.py / qwen2.py (usually a config
field set plus a call to causal_lm.build_causal_lm), a parameter dict here and a Recipe in
:func:`recipes`. The conftest gives every recipe a session fixture named after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import (
    deepseek_v3,
    gemma3,
    gemma4,
    gpt2,
    gpt_oss,
    granitemoe,
    llama,
    llava,
    mixtral,
    mlx_community,
    phi3,
    qwen2,
    qwen3,
    qwen3_5,
    smollm3,
    weights,
)
from .tokenizer import GPT2_VOCAB

# Bump when a builder's output changes for unchanged parameters (code changes are not hashed).
FIXTURE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[Path, dict[str, Any]], None]
    params: dict[str, Any]
    default: bool = True  # part of the default set built by main() / the session fixtures
    uses_torch: bool = True  # False: skip importing torch/transformers (~3 s) for this one

    def stamp(self) -> dict[str, Any]:
        """Everything the output depends on, other than code (that is FIXTURE_VERSION)."""
        return {
            "name": self.name,
            "fixture_version": FIXTURE_VERSION,
            "params": self.params,
            "init": weights.init_params() if self.uses_torch else None,
        }

    def digest(self) -> str:
        blob = json.dumps(self.stamp(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_GPT2_TINY = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 512,
    "vocab_size": GPT2_VOCAB,
    "seed": 1234,
}
_GPT2_SMALL = {
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
    "vocab_size": GPT2_VOCAB,
    "seed": 124,
}
_LLAMA_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": GPT2_VOCAB,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "seed": 4321,
}
_LLAMA3_TINY = {
    **_LLAMA_TINY,
    # Real Llama 3 theta; with head_dim 16 and original_max 256 the inverse frequencies hit
    # all three llama3 branches (kept, smoothly interpolated, divided by factor).
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "tie_word_embeddings": True,
    "seed": 5678,
}
# SmolLM2-135M's shape (30 layers, GQA 9/3, tied head) with random weights, for
# benchmarks that must run where the real GGUF cannot be carried (the GPU machine).
_SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "seed": 135,
}
_QWEN2_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    # Padded past the tokenizer (GPT-2 + 2 ChatML tokens = 50259) like Qwen's 151936 vs
    # 151665; the padding rows are zero so a random model never argmaxes into them.
    "vocab_size": 50304,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "seed": 8765,
}


_QWEN3_TINY = {
    **_QWEN2_TINY,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "seed": 3303,
}
_QWEN3_MOE_TINY = {
    **_QWEN3_TINY,
    # 4 experts, top 2, renormalized (Qwen3-30B-A3B's norm_topk_prob); layer 1 dense, as
    # mlp_only_layers allows.
    "num_hidden_layers": 3,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],
    "seed": 3330,
}
# Qwen3.5's structure at toy size: linear-attention (Gated DeltaNet) layers around full
# attention ones, GQA in both (4/2 query/KV heads; 4 value heads over 2 key heads), half
# of each attention head rotated (the real models: a quarter).
_QWEN3_5_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": [
        "linear_attention",
        "full_attention",
        "linear_attention",
        "full_attention",
    ],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "vocab_size": 50304,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    },
    "tie_word_embeddings": False,
    "seed": 3535,
}
_QWEN3_5_MOE_TINY = {
    **_QWEN3_5_TINY,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "tie_word_embeddings": True,
    "seed": 3536,
}
# A mid-size Qwen3.5 (~0.6B: 24 layers, 18 of them linear, Qwen3.5's 128-wide state heads)
# with random weights, for benchmarks/hybrid_prefix.py (lazy: not built by the suite).
_QWEN3_5_MEDIUM_SHAPE = {
    **_QWEN3_5_TINY,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "intermediate_size": 3584,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 8192,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
    },
    "seed": 3537,
}
_QWEN3_5_MEDIUM_SHAPE["layer_types"] = _QWEN3_5_MEDIUM_SHAPE["layer_types"] * 6
# Qwen3-Next-80B-A3B's conventions: layer 1 dense (mlp_only_layers), the rest sparse.
_QWEN3_NEXT_TINY = {
    **_QWEN3_5_MOE_TINY,
    "mlp_only_layers": [1],
    "decoder_sparse_step": 1,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "seed": 3800,
}
_MIXTRAL_TINY = {
    **_LLAMA_TINY,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "intermediate_size": 64,
    "rope_theta": 1000000.0,
    "seed": 8722,
}
_GRANITEMOE_TINY = {
    **_MIXTRAL_TINY,
    "tie_word_embeddings": True,
    # Granite's multipliers, kept where random logits stay well separated (the real 1B's
    # are 12, 1/64, 0.22 and 6).
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.125,
    "residual_multiplier": 0.5,
    "logits_scaling": 2.0,
    "seed": 4004,
}
# Gemma 3 270M's structure at toy size: 1 KV head of head_dim larger than hidden/heads,
# five sliding layers then a global one (6 layers), a 32-token window.
_GEMMA3_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 128,
    "vocab_size": 50304,
    "max_position_embeddings": 512,
    "query_pre_attn_scalar": 32,
    "sliding_window": 32,
    "sliding_window_pattern": 3,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "tie_word_embeddings": True,
    "seed": 2703,
}
_PHI3_TINY = {
    **_LLAMA_TINY,
    "num_key_value_heads": 4,
    "partial_rotary_factor": 0.75,
    "original_max_position_embeddings": 256,
    "sliding_window": 48,
    "seed": 3141,
}

# SmolLM3-3B's structure at toy size: every second layer NoPE (the real one: every fourth of
# 36), GQA, tied head, its rope base.
_SMOLLM3_TINY = {
    **_LLAMA_TINY,
    "num_hidden_layers": 4,
    "no_rope_layer_interval": 2,
    "rope_theta": 5000000.0,
    "tie_word_embeddings": True,
    "pad_token_id": GPT2_VOCAB - 1,  # its default (128004) is past the toy vocabulary
    "seed": 3003,
}

# Llava around the Llama toy decoder; a 2-layer CLIP tower the engine must leave out.
_LLAVA_TINY = {
    "text_config": {
        **{k: v for k, v in _LLAMA_TINY.items() if k != "seed"},
        "model_type": "llama",
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
    },
    "image_token_index": GPT2_VOCAB - 2,
    "tie_word_embeddings": False,
    "seed": 7007,
}

# DeepSeek-V3's structure at toy size: compressed query and latent KV (rank 32 + rope 8
# cached per token, against 4 heads x (24 + 16) expanded), YaRN with mscale and
# mscale_all_dim both in play, one dense layer then 8 experts in 4 groups (top 2 groups,
# top 2 experts, renormalized, scaled 2.5) beside a shared expert.
_DEEPSEEK_V3_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "vocab_size": GPT2_VOCAB,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "tie_word_embeddings": False,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "seed": 6710,
}
# The same shape in mlx-community's 4-bit layout, built with mlx-lm (group 32: the 16-wide
# embed_q stays float, unembed_out and the experts quantize).
_DEEPSEEK_V3_Q4_TINY = {
    **{k: v for k, v in _DEEPSEEK_V3_TINY.items() if k != "tie_word_embeddings"},
    "bits": 4,
    "group_size": 32,
    "seed": 6740,
}

# gpt-oss-20b's structure at toy size: sliding (32) and full layers alternating, 4 experts
# top 2, GQA 4:2; YaRN whose original context (128) the test prompts pass; a swiglu_limit
# low enough that the clamps act on these random activations (the real one is 7).
_GPT_OSS_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 32,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 32,
    "swiglu_limit": 2.0,
    "vocab_size": GPT2_VOCAB,
    "max_position_embeddings": 512,
    "rope_theta": 150000.0,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 128,
    },
    "seed": 2020,
}

# Gemma 4's features at toy size, all at once (E2B's per-layer embeddings and KV sharing,
# 26B-A4B's experts beside the MLP and keys-as-values global layers): two sliding (32)
# layers to one global, global heads twice as wide with one KV head, the last two layers
# reading layers 2 and 3's KV.
_GEMMA4_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_global_key_value_heads": 1,
    "attention_k_eq_v": True,
    "intermediate_size": 64,
    "vocab_size": GPT2_VOCAB,
    "max_position_embeddings": 512,
    "sliding_window": 32,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
    "num_kv_shared_layers": 2,
    "use_double_wide_mlp": True,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": GPT2_VOCAB,
    "enable_moe_block": True,
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
    "final_logit_softcapping": 30.0,
    "seed": 4404,
}


# Real shapes with random weights, for benchmarks (lazy: not built by the test suite).
_GEMMA3_270M_SHAPE = {
    **_GEMMA3_TINY,
    "hidden_size": 640,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "intermediate_size": 2048,
    "vocab_size": 262144,
    "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "seed": 270,
}
_QWEN3_0_6B_SHAPE = {
    **_QWEN3_TINY,
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "seed": 600,
}


# mlx-community's 4-bit layout (group 64), built with MLX alone: a toy one the suite loads,
# and Llama 3.1 8B's shape (32 layers, GQA 32/8, 14336-wide MLP, 128k vocabulary; 4.5 GB),
# what most Mac users run.
_LLAMA_Q4_TINY = {
    **_LLAMA3_TINY,
    "num_attention_heads": 8,
    "head_dim": 8,
    "tie_word_embeddings": False,
    "vocab_size": 50304,
    "bits": 4,
    "group_size": 64,
    "seed": 6404,
}
_LLAMA3_8B_Q4 = {
    **_LLAMA_Q4_TINY,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "seed": 8008,
}

# Qwen3-30B-A3B as mlx-community/Qwen3-30B-A3B-4bit has it (48 sparse layers of 128
# experts, top 8, GQA 32/4 with head_dim 128, 151936 vocabulary; ~17 GB), the MoE Mac users
# run most; and a toy twin in the same layout the suite loads.
_QWEN3_MOE_Q4_TINY = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 50304,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bits": 4,
    "group_size": 64,
    "seed": 3034,
}
_QWEN3_30B_A3B_Q4 = {
    **_QWEN3_MOE_Q4_TINY,
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "seed": 30003,
}


def _transformers_version() -> str:
    # save_pretrained output depends on it; metadata lookup avoids importing transformers.
    return importlib.metadata.version("transformers")


def recipes() -> dict[str, Recipe]:
    tv = _transformers_version()
    listed = [
        Recipe("gpt2-tiny", gpt2.build_gpt2_hub, {**_GPT2_TINY, "verify": True}),
        Recipe("gpt2-tiny-hf5", gpt2.build_gpt2_hf5, {**_GPT2_TINY, "transformers": tv}),
        Recipe(
            "gpt2-tiny-sharded",
            gpt2.build_gpt2_sharded,
            {**_GPT2_TINY, "max_shard_bytes": 2 * 1024 * 1024},
        ),
        Recipe("gpt2-corrupt", gpt2.build_gpt2_corrupt, {**_GPT2_TINY, "keep_bytes": 1000}),
        Recipe("gpt2-no-weights", gpt2.build_gpt2_no_weights, dict(_GPT2_TINY), uses_torch=False),
        Recipe("llama-tiny", llama.build_llama, {**_LLAMA_TINY, "transformers": tv}),
        Recipe("llama3-tiny", llama.build_llama_classic, {**_LLAMA3_TINY, "transformers": tv}),
        Recipe("qwen2-tiny", qwen2.build_qwen2, {**_QWEN2_TINY, "transformers": tv}),
        Recipe("qwen3-tiny", qwen3.build_qwen3, {**_QWEN3_TINY, "transformers": tv}),
        Recipe("qwen3-moe-tiny", qwen3.build_qwen3_moe, {**_QWEN3_MOE_TINY, "transformers": tv}),
        Recipe(
            "qwen3-moe-tiny-hf5",
            qwen3.build_qwen3_moe_hf5,
            {**_QWEN3_MOE_TINY, "transformers": tv},
        ),
        Recipe("qwen35-tiny", qwen3_5.build_qwen3_5, {**_QWEN3_5_TINY, "transformers": tv}),
        Recipe(
            "qwen35-moe-tiny",
            qwen3_5.build_qwen3_5_moe,
            {**_QWEN3_5_MOE_TINY, "transformers": tv},
        ),
        Recipe(
            "qwen3-next-tiny",
            qwen3_5.build_qwen3_next,
            {**_QWEN3_NEXT_TINY, "transformers": tv},
        ),
        Recipe("mixtral-tiny", mixtral.build_mixtral, {**_MIXTRAL_TINY, "transformers": tv}),
        Recipe("gemma3-tiny", gemma3.build_gemma3, {**_GEMMA3_TINY, "transformers": tv}),
        Recipe(
            "granitemoe-tiny",
            granitemoe.build_granitemoe,
            {**_GRANITEMOE_TINY, "transformers": tv},
        ),
        Recipe("llava-tiny", llava.build_llava, {**_LLAVA_TINY, "transformers": tv}),
        Recipe("smollm3-tiny", smollm3.build_smollm3, {**_SMOLLM3_TINY, "transformers": tv}),
        Recipe("phi3-tiny", phi3.build_phi3, {**_PHI3_TINY, "transformers": tv}),
        Recipe("gemma4-tiny", gemma4.build_gemma4, {**_GEMMA4_TINY, "transformers": tv}),
        Recipe("gpt-oss-tiny", gpt_oss.build_gpt_oss, {**_GPT_OSS_TINY, "transformers": tv}),
        Recipe(
            "gpt-oss-tiny-mxfp4",
            gpt_oss.build_gpt_oss_mxfp4,
            {**_GPT_OSS_TINY, "transformers": tv},
        ),
        Recipe(
            "deepseek-v3-tiny",
            deepseek_v3.build_deepseek_v3,
            {**_DEEPSEEK_V3_TINY, "transformers": tv},
        ),
        Recipe(
            "deepseek-v3-q4-tiny",
            deepseek_v3.build_deepseek_v3_mlx_community,
            {**_DEEPSEEK_V3_Q4_TINY, "mlx_lm": importlib.metadata.version("mlx-lm")},
            uses_torch=False,
        ),
        Recipe(
            "llama-q4-tiny",
            mlx_community.build_llama_quantized,
            _LLAMA_Q4_TINY,
            uses_torch=False,
        ),
        Recipe(
            "llama3-8b-q4",
            mlx_community.build_llama_quantized,
            _LLAMA3_8B_Q4,
            default=False,
            uses_torch=False,
        ),
        Recipe(
            "qwen3-moe-q4-tiny",
            mlx_community.build_qwen3_moe_quantized,
            _QWEN3_MOE_Q4_TINY,
            uses_torch=False,
        ),
        Recipe(
            "qwen3-30b-a3b-q4",
            mlx_community.build_qwen3_moe_quantized,
            _QWEN3_30B_A3B_Q4,
            default=False,
            uses_torch=False,
        ),
        Recipe(
            "gpt2-small-shape",
            gpt2.build_gpt2_hub,
            {**_GPT2_SMALL, "verify": False},
            default=False,
        ),
        Recipe(
            "gemma3-270m-shape",
            gemma3.build_gemma3,
            {**_GEMMA3_270M_SHAPE, "transformers": tv},
            default=False,
        ),
        Recipe(
            "qwen3-0.6b-shape",
            qwen3.build_qwen3,
            {**_QWEN3_0_6B_SHAPE, "transformers": tv},
            default=False,
        ),
        Recipe(
            "qwen35-medium-shape",
            qwen3_5.build_qwen3_5,
            {**_QWEN3_5_MEDIUM_SHAPE, "transformers": tv},
            default=False,
        ),
        Recipe(
            "smollm2-135m-shape",
            llama.build_llama,
            {**_SMOLLM2_SHAPE, "transformers": tv},
            default=False,
        ),
    ]
    return {r.name: r for r in listed}


def fixture_names(include_lazy: bool = False) -> list[str]:
    return [n for n, r in recipes().items() if include_lazy or r.default]
