"""MLX quantization of safetensors checkpoints: at load time, saved copies, bad requests."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import captured_logits, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.loading import loader
from nanovllm_mlx.loading.quantize import save_quantized
from nanovllm_mlx.models import fusion

ONE = SamplingParams(temperature=0.0, max_tokens=1)
SMALL = {"kv_cache_gb": 0.02, "dtype": "float32"}
PROMPTS = [random_ids(n, seed=n) for n in (1, 5, 20, 60)]


def logits_of(llm: LLM) -> np.ndarray:
    """Next-token logits of each of PROMPTS, [len(PROMPTS), vocab]."""
    with captured_logits() as seen:
        llm.generate(PROMPTS, ONE)
    return np.concatenate(seen)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_gpt2_computes_its_dequantized_weights(bits: int, gpt2_tiny: Path):
    """The quantized model (tied head through QuantizedEmbedding.as_linear) gives the logits
    of the float model holding the dequantized weights, to float32 rounding; and its
    distance to the float32 model is the quantization noise, bounded below. Measured on
    this random GPT-2: relative L2 error 0.024 (8-bit) / 0.43 (4-bit), correlation
    0.9997 / 0.906; random weights have no outliers to protect, so 4-bit noise (~9% per
    weight) compounds through every layer."""
    quantized = LLM(str(gpt2_tiny), quantize=bits, quantize_group_size=64, **SMALL)
    layers = quantized_layers(quantized.engine.model_runner.model)
    assert {"wte", "h.0.attn.c_attn", "h.1.mlp.c_proj"} <= set(layers)
    got = logits_of(quantized)

    # No prefix caching: the second pass must recompute the K/V with the new weights.
    exact = LLM(str(gpt2_tiny), enable_prefix_caching=False, **SMALL)
    float_logits = logits_of(exact)
    exact.engine.model_runner.model.update(
        nn.utils.tree_unflatten(
            [
                (f"{path}.weight", mx.dequantize(m.weight, m.scales, m.biases, 64, bits))
                for path, m in layers.items()
            ]
        )
    )
    np.testing.assert_allclose(got, logits_of(exact), atol=1e-4, rtol=1e-4)

    rel = np.linalg.norm(got - float_logits) / np.linalg.norm(float_logits)
    corr = np.corrcoef(got.ravel(), float_logits.ravel())[0, 1]
    if bits == 8:
        assert rel < 0.05 and corr > 0.999
        assert (got.argmax(-1) == float_logits.argmax(-1)).all()
    else:
        assert rel < 0.6 and corr > 0.85


def test_quantized_llama_with_tied_head_generates(llama3_tiny: Path):
    llm = LLM(str(llama3_tiny), quantize=4, quantize_group_size=32, **SMALL)
    model = llm.engine.model_runner.model
    assert isinstance(model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert len(llm.generate(PROMPTS, params)[2]["token_ids"]) == 8


def test_layers_not_divisible_by_the_group_size_stay_float(llama_tiny: Path):
    # hidden 64 at group 128: only down_proj (input width 128) can be quantized.
    model = LLM(str(llama_tiny), quantize=8, quantize_group_size=128, **SMALL)
    layers = quantized_layers(model.engine.model_runner.model)
    assert set(layers) == {"layers.0.mlp.down_proj", "layers.1.mlp.down_proj"}


def test_nothing_quantizable_is_a_clear_error():
    config = {
        "model_type": "llama",
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    with pytest.raises(ValueError, match="divisible by quantize_group_size 64"):
        loader.quantize_model(loader.build_model(config), 4, 64)


@pytest.mark.parametrize("fixture", ["gpt2_tiny", "qwen2_tiny"])
def test_save_quantized_round_trip(fixture: str, request: pytest.FixtureRequest, tmp_path: Path):
    src = request.getfixturevalue(fixture)
    dst = save_quantized(src, tmp_path / "q4", bits=4, group_size=32, dtype="float32")
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    assert (dst / "tokenizer_config.json").exists()
    _, metadata = mx.load(str(dst / "model.safetensors"), return_metadata=True)
    assert metadata["format"] == "mlx"

    reloaded = LLM(str(dst), keep_quantized=True, **SMALL)  # the CPU would dequantize it
    assert quantized_layers(reloaded.engine.model_runner.model)
    at_load = LLM(str(src), quantize=4, quantize_group_size=32, **SMALL)
    np.testing.assert_array_equal(logits_of(reloaded), logits_of(at_load))
    assert reloaded.tokenizer.encode("Hello world") == at_load.tokenizer.encode("Hello world")

    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(dst), quantize=8, **SMALL)
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(src, dst)
    with pytest.raises(ValueError, match="overwrite its source"):
        save_quantized(src, src)


def test_an_mlx_community_checkpoint_loads_quantized_and_computes_its_weights(
    llama_q4_tiny: Path,
):
    """The layout `mlx_lm.convert -q` writes (sharded with an index, packed uint32 weights,
    float16 scales and biases, `quantization` in the config), as the 8B benchmark fixture
    has it: kept quantized, every projection and the embedding are 4-bit layers of group 64,
    and the logits are those of the float model holding the dequantized weights."""
    kept = LLM(str(llama_q4_tiny), keep_quantized=True, **SMALL)
    layers = quantized_layers(kept.engine.model_runner.model)
    # On a GPU the engine joins q/k/v into one layer at load (models/fusion.py).
    k_proj = "qkv_proj" if fusion.enabled() else "k_proj"
    assert {
        "embed_tokens",
        "lm_head",
        f"layers.1.self_attn.{k_proj}",
        "layers.0.mlp.down_proj",
    } <= (set(layers))
    assert {(m.bits, m.group_size) for m in layers.values()} == {(4, 64)}
    dequantized = LLM(str(llama_q4_tiny), keep_quantized=False, **SMALL)
    assert not quantized_layers(dequantized.engine.model_runner.model)
    np.testing.assert_allclose(logits_of(kept), logits_of(dequantized), atol=1e-4, rtol=1e-4)
