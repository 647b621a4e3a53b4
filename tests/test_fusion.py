"""Projections joined at load (models/fusion.py, NANOVLLM_FUSE_PROJECTIONS=1): an engine
computes the same logits and tokens with q/k/v and gate/up joined as without, float and
quantized, compiled and eager, for Llama, Qwen3 (its own q/k norms), gpt-oss (its own
attention, biased experts in MXFP4) and the mixtures of experts (experts' gate and up
joined per expert); parts that differ are never joined."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import SMALL_KV, captured_logits, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.models import fusion


def run(path: Path, fused: bool, monkeypatch: pytest.MonkeyPatch, **engine: Any) -> tuple:
    """Greedy tokens and every sampled logits row of three prompts in one batch (chunked
    prefill: 24 tokens a step), and the joined modules' names."""
    monkeypatch.setenv("NANOVLLM_FUSE_PROJECTIONS", "1" if fused else "0")
    llm = LLM(str(path), max_num_batched_tokens=24, **{**SMALL_KV, **engine})
    names = {name.rsplit(".", 1)[-1] for name, _ in llm.engine.model_runner.model.named_modules()}
    prompts = [random_ids(n, seed=n) for n in (5, 19, 40)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with captured_logits() as seen:
        tokens = [o["token_ids"] for o in llm.generate(prompts, greedy)]
    return tokens, seen, names


@pytest.mark.parametrize(
    "fixture,engine",
    [
        ("llama3_tiny", {}),
        ("llama3_tiny", {"compile_decode": True}),
        ("qwen3_tiny", {}),
        ("llama_q4_tiny", {"keep_quantized": True}),
        ("gpt_oss_tiny", {}),
        ("gpt_oss_tiny_mxfp4", {}),
        ("qwen3_moe_tiny", {}),
        ("qwen3_moe_q4_tiny", {}),
        ("deepseek_v3_q4_tiny", {}),
    ],
    ids=[
        "llama", "llama-compiled", "qwen3", "llama-4bit-kept", "gpt-oss", "gpt-oss-mxfp4",
        "qwen3-moe", "qwen3-moe-4bit", "deepseek-v3-4bit",
    ],
)  # fmt: skip
def test_joined_projections_compute_what_the_parts_did(
    fixture: str, engine: dict, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
):
    path = request.getfixturevalue(fixture)
    tokens, seen, names = run(path, False, monkeypatch, **engine)
    assert "qkv_proj" not in names and "gate_up_proj" not in names
    fused_tokens, fused_seen, fused_names = run(path, True, monkeypatch, **engine)
    if fixture != "deepseek_v3_q4_tiny":  # latent attention: no q/k/v to join
        assert "qkv_proj" in fused_names and "q_proj" not in fused_names
    assert "gate_up_proj" in fused_names and "up_proj" not in fused_names
    assert fused_tokens == tokens
    assert len(fused_seen) == len(seen)
    for a, b in zip(fused_seen, seen):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def quantized(out: int, bits: int = 4, group: int = 64, bias: bool = False) -> nn.Module:
    layer = nn.Sequential(nn.Linear(128, out, bias=bias))
    nn.quantize(layer, group_size=group, bits=bits)
    return layer.layers[0]


def test_parts_that_differ_are_not_joined():
    assert fusion.join_linears(quantized(64), quantized(32, bits=8)) is None  # mixed bits
    assert fusion.join_linears(quantized(64), quantized(32, group=32)) is None
    assert fusion.join_linears(quantized(64), nn.Linear(128, 32)) is None
    assert fusion.join_linears(quantized(64, bias=True), quantized(32)) is None
    assert fusion.join_linears(nn.Linear(128, 64), nn.Linear(96, 32)) is None  # widths
    half = nn.Linear(128, 32)
    half.update({"weight": half.weight.astype(mx.float16), "bias": half.bias.astype(mx.float16)})
    assert fusion.join_linears(nn.Linear(128, 64), half) is None  # dtypes


def test_a_joined_layer_is_its_parts_side_by_side():
    parts = [quantized(64, bias=True), quantized(32, bias=True), quantized(32, bias=True)]
    joined = fusion.join_linears(*parts)
    assert type(joined) is nn.QuantizedLinear and joined.bits == 4 and joined.group_size == 64
    x = mx.random.normal((3, 128))
    want = mx.concatenate([p(x) for p in parts], axis=-1)
    assert mx.array_equal(joined(x), want).item()
    assert parts[0].weight.shape == (64, 16)  # the parts are left as they were


def test_experts_are_joined_per_expert():
    """An experts' layer's outputs are axis 1 of [experts, out, in]: joined there, each
    expert's gate rows then its up rows, so every row routed to expert e gets both."""
    from nanovllm_mlx.models.switch import SwitchLinear

    gate, up = SwitchLinear(32, 16, 4), SwitchLinear(32, 8, 4)
    joined = fusion.join_linears(gate, up)
    assert joined is not None and joined.weight.shape == (4, 24, 32)
    x = mx.random.normal((5, 1, 1, 32))
    idx = mx.array([[3, 0], [1, 2], [0, 0], [2, 3], [1, 1]])
    want = mx.concatenate([gate(x, idx), up(x, idx)], axis=-1)
    assert mx.allclose(joined(x, idx), want, atol=1e-5).item()
    assert fusion.join_linears(gate, SwitchLinear(32, 8, 3)) is None  # expert counts
