"""Qwen3, Qwen3-MoE, Mixtral, Gemma 3 and Phi-3 through the engine vs transformers, float32:
random-weight checkpoints in each architecture's Hub layout, prompts run as one continuous
batch (chunked prefills sharing steps with decodes), logits of the prefill and of every
decode step, and the greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import check_batched_parity, random_ids

from nanovllm_mlx import LLM
from nanovllm_mlx.loading.loader import build_model

STEPS = 8
# Lengths: one past every window below (Gemma 3's 32, Phi-3's 48), a short one, a
# one-token prompt, and one that spans several 16-token blocks.
PROMPTS = [random_ids(n, seed=n) for n in (70, 5, 1, 37)]


@pytest.mark.parametrize(
    "fixture",
    [
        "qwen3_tiny",  # q/k RMSNorm per head, explicit head_dim, tied head
        "qwen3_moe_tiny",  # 4 experts top-2 renormalized, one dense layer
        "mixtral_tiny",  # Hub layout w1/w2/w3 experts, untied head
        "gemma3_tiny",  # 2 sliding (32) : 1 global layers, GeGLU, scaled embeddings
        "phi3_tiny",  # fused qkv/gate_up, LongRoPE (short factors), partial rotary, window 48
    ],
)
def test_batched_run_matches_transformers(fixture: str, request: pytest.FixtureRequest):
    path = request.getfixturevalue(fixture)
    check_batched_parity(path, PROMPTS, STEPS, max_num_batched_tokens=40)


def test_layer_windows_are_declared(gemma3_tiny: Path, phi3_tiny: Path):
    gemma = LLM(str(gemma3_tiny), kv_cache_gb=0.02).engine
    assert gemma.model_runner.model.spec.layer_windows == (32, 32, None) * 2
    # A global layer sees everything: no block ever leaves every layer's window.
    assert gemma.block_manager.sliding_window is None
    phi = LLM(str(phi3_tiny), kv_cache_gb=0.02).engine
    assert phi.block_manager.sliding_window == 48


def test_unsupported_gemma_softcapping_is_a_clear_error(gemma3_tiny: Path):
    import json

    config = json.loads((gemma3_tiny / "config.json").read_text())
    with pytest.raises(ValueError, match="soft-capping"):
        build_model({**config, "attn_logit_softcapping": 50.0})
