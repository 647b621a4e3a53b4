"""SmolLM3 beyond the logits parity of test_architectures.py (batched, chunked prefill, vs
transformers): its NoPE layers, preemption and prefix-cache hits giving the same tokens,
and its configuration's edge cases. Tensor parallelism: test_tensor_parallel.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SMALL_KV, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.loading.loader import build_model
from nanovllm_mlx.models import smollm3

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [random_ids(n, seed=100 + n) for n in (30, 45, 12, 60, 33, 21)]


@pytest.fixture(scope="module")
def reference(smollm3_tiny: Path) -> list[list[int]]:
    llm = LLM(str(smollm3_tiny), enable_prefix_caching=False, **SMALL_KV)
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY)]


def test_nope_layers_follow_the_config(smollm3_tiny: Path):
    config = json.loads((smollm3_tiny / "config.json").read_text())
    assert config["no_rope_layers"] == [1, 0, 1, 0]
    model = build_model(config)
    kinds = [type(layer.self_attn.rope).__name__ for layer in model.layers]
    assert kinds == ["RotaryEmbedding", "NoRope", "RotaryEmbedding", "NoRope"]


def test_preemption_gives_the_same_tokens(smollm3_tiny: Path, reference: list[list[int]]):
    # 2 layers x 2 KV heads x 16 dims x 4 bytes x K and V = 1 KiB a token... 4 layers here:
    # 12 blocks of 16 tokens hold about three of these ~60-token sequences at once.
    per_block = 16 * 4 * 2 * 16 * 2 * 4
    tight = LLM(str(smollm3_tiny), kv_cache_gb=12 * per_block / 2**30, max_model_len=128)
    assert tight.engine.block_manager.num_blocks == 12
    got = [o["token_ids"] for o in tight.generate(PROMPTS, GREEDY)]
    assert tight.stats()["preemptions"] > 0
    assert got == reference


def test_prefix_cache_hits_give_the_same_tokens(smollm3_tiny: Path):
    shared = random_ids(40, seed=7)
    prompts = [shared + random_ids(5, seed=8), shared + random_ids(9, seed=9)]
    cold = LLM(str(smollm3_tiny), enable_prefix_caching=False, **SMALL_KV)
    want = [o["token_ids"] for o in cold.generate(prompts, GREEDY)]
    warm = LLM(str(smollm3_tiny), max_num_batched_tokens=16, **SMALL_KV)
    warm.generate(prompts[:1], GREEDY)
    outs = warm.generate(prompts, GREEDY)
    assert [o["num_cached_tokens"] for o in outs] == [32, 32]
    assert [o["token_ids"] for o in outs] == want


def test_sliding_window_slides_the_nope_layers():
    """transformers' rule: with use_sliding_window, the NoPE layers are the sliding ones."""
    args = smollm3.ModelArgs.from_dict(
        {
            "num_hidden_layers": 8,
            "use_sliding_window": True,
            "sliding_window": 64,
            "max_position_embeddings": 1024,
        }
    )
    assert args.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert args.layer_windows == (None, None, None, 64, None, None, None, 64)
    plain = smollm3.ModelArgs.from_dict({"num_hidden_layers": 8})
    assert plain.layer_windows == () and plain.rope_theta == 2_000_000.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"no_rope_layers": [1, 0]}, "no_rope_layers has 2 entries for 4 layers"),
        ({"no_rope_layer_interval": 0}, "no_rope_layer_interval must be >= 1"),
    ],
)
def test_bad_nope_configs_are_clear_errors(bad: dict, match: str):
    with pytest.raises(ValueError, match=match):
        build_model({"model_type": "smollm3", "num_hidden_layers": 4, **bad})
