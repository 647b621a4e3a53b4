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
        "granitemoe_tiny",  # fused Hub experts, Granite's four multipliers, tied head
        "smollm3_tiny",  # NoPE on every second layer, transformers-5 config
    ],
)
def test_batched_run_matches_transformers(fixture: str, request: pytest.FixtureRequest):
    path = request.getfixturevalue(fixture)
    # smollm3_tiny's float32 logits are up to 8.5e-5 from float64's in transformers itself
    # (make_fixtures' noise check), so two float32 runs may differ by twice that: with
    # transformers 5.25 one logit of 50,257 missed 1e-4 by 1.7e-5.
    atol = 2e-4 if fixture == "smollm3_tiny" else 1e-4
    check_batched_parity(path, PROMPTS, STEPS, atol=atol, max_num_batched_tokens=40)


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


@pytest.mark.parametrize("fixture", ["mixtral_tiny", "qwen3_moe_tiny", "granitemoe_tiny"])
def test_quantized_experts_compute_their_dequantized_weights(
    fixture: str, request: pytest.FixtureRequest
):
    """--quantize 4 turns the stacked experts into QuantizedSwitchLinear (gather_qmm); the
    logits equal those of the float model holding the dequantized weights."""
    import mlx.nn as nn
    from helpers import check_dequantized_twin

    from nanovllm_mlx.models.switch import QuantizedSwitchLinear

    path = request.getfixturevalue(fixture)
    small = {"kv_cache_gb": 0.02, "dtype": "float32", "enable_prefix_caching": False}
    quantized = LLM(str(path), quantize=4, quantize_group_size=32, **small)
    model = quantized.engine.model_runner.model
    layers = {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
    }
    assert sum(isinstance(m, QuantizedSwitchLinear) for m in layers.values()) >= 3
    check_dequantized_twin(quantized, path, layers, PROMPTS, **small)


def test_cli_ask_quantized_moe(mixtral_tiny: Path):
    import subprocess

    from helpers import REPO_ROOT, SMALL_KV_ARGS, cli_argv

    argv = cli_argv("ask", "--quantize", "4", "-m", str(mixtral_tiny), "--no-chat")
    result = subprocess.run(
        [*argv, *SMALL_KV_ARGS, "--max-tokens", "4", "Hello there"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
