"""Llama / Llama 3 / Qwen2 (models/llama.py) through the engine vs transformers, float32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import SMALL_KV, check_parity, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.loading.loader import build_model

STEPS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
SMALL = {**SMALL_KV, "dtype": "float32"}


@pytest.mark.parametrize(
    "fixture, length",
    [
        ("llama_tiny", 37),  # GQA 4:2, untied head, transformers-5 rope_parameters config
        ("llama3_tiny", 300),  # llama3 rope scaling (only visible past ~100 positions), tied
        ("qwen2_tiny", 37),  # q/k/v biases, padded vocab
    ],
)
def test_matches_transformers_prefill_and_decode(
    fixture: str, length: int, request: pytest.FixtureRequest
):
    check_parity(request.getfixturevalue(fixture), random_ids(length), STEPS)


def _with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update({"rope_theta": 10000.0, **changes})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    ],
)
def test_rope_scaling_variants(scaling: dict, llama_tiny: Path, tmp_path: Path):
    path = _with_config(llama_tiny, tmp_path / "model", rope_scaling=scaling)
    # YaRN scales attention logits by ~1.3 (its mscale squared): measured max abs diff
    # 1.2e-4 there against 5e-5 for the plain rotation, so it gets 2e-4.
    atol = 2e-4 if scaling["rope_type"] == "yarn" else 1e-4
    check_parity(path, random_ids(200, seed=1), STEPS, atol)


def test_batched_prompts_at_different_positions_match_alone(llama3_tiny: Path):
    # Rotary positions are per token: a decode at position 250 and a prefill chunk starting
    # at 0 share one step.
    llm = LLM(str(llama3_tiny), **SMALL)
    prompts = [random_ids(n, seed=n) for n in (250, 3, 40, 1)]
    together = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, together):
        assert out["token_ids"] == llm.generate([prompt], GREEDY)[0]["token_ids"]


def _mistral(llama_tiny: Path, tmp_path: Path, window: int = 32) -> Path:
    return _with_config(
        llama_tiny,
        tmp_path / "mistral",
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        sliding_window=window,
    )


def test_mistral_sliding_window_matches_transformers_past_the_window(
    llama_tiny: Path, tmp_path: Path
):
    # An 80-token prompt, 2.5 windows long: every layer must stop attending 32 keys back.
    path = _mistral(llama_tiny, tmp_path)
    check_parity(path, random_ids(80), STEPS)
    assert LLM(str(path), **SMALL).engine.max_model_len == 512  # no cap at the window


def test_mistral_frees_the_blocks_that_leave_the_window(llama_tiny: Path, tmp_path: Path):
    """Chunked prefill and decode free what no layer can see; the output is the same as
    with every block kept (a window as wide as the context), and a repeated prompt still
    hits the prefix cache."""
    path = _mistral(llama_tiny, tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompt = random_ids(200, seed=3)
    llm = LLM(str(path), max_num_batched_tokens=64, **SMALL)
    engine = llm.engine
    assert engine.block_manager.sliding_window == 32
    engine.add_request(prompt, params)
    used, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.token_ids
        used.append(engine.block_manager.stats().used)
    # 13 blocks at admission, 2 of them freed after the first 64-token chunk; while
    # decoding, the window's 32 keys span at most 3 blocks.
    assert used[0] == 11 and max(used[4:]) <= 3, used
    again = llm.generate([prompt], params)[0]
    assert again["token_ids"] == tokens and again["num_cached_tokens"] > 0
    full = _mistral(llama_tiny, tmp_path / "full", window=4096)  # wider than the context
    assert LLM(str(full), **SMALL).generate([prompt], params)[0]["token_ids"] != tokens


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope scaling type"),
        ({"hidden_act": "gelu"}, "activation"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"model_type": "falcon"}, "unsupported model_type 'falcon'"),
    ],
)
def test_bad_configs_are_clear_errors(change: dict, message: str, llama_tiny: Path):
    config = json.loads((llama_tiny / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        build_model(config)
