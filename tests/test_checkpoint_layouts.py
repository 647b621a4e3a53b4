"""Every checkpoint layout people download, for the architectures the engine runs:
mlx-community's (what mlx-lm's own classes, quantizer and saver write: stacked switch_mlp
experts, 4-bit affine or MLX's float modes, per-layer quantization entries), transformers
5's (renamed config keys), and the text part of multimodal checkpoints; and the loader's
one-line error when none fits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from helpers import SMALL_KV, check_batched_parity, random_ids
from model_fixtures.mlx_lm_layout import (
    CONFIGS,
    build_mlx_lm,
    mlx_lm_greedy,
    multimodal_gemma3_config,
)

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.errors import CheckpointLayoutError
from nanovllm_mlx.loading.quantize import save_quantized

STEPS = 8
# Past Gemma's 16-token window, a short one, one token, several 16-token blocks.
PROMPTS = [random_ids(n, seed=n) for n in (40, 5, 1, 23)]
# A real multimodal repo carries its image tower; the engine must leave it out.
_VISION = {
    "vision_tower.vision_model.embeddings.patch_embedding.weight": ((8, 3, 4, 4), mx.float32),
    "multi_modal_projector.mm_input_projection_weight": ((8, 8), mx.float32),
}


def _case(config: dict[str, Any], **quant: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return json.loads(json.dumps(config)), quant


CASES = {
    **{arch: _case(CONFIGS[arch]) for arch in CONFIGS},
    # mlx-community's Gemma 3 4B+ (model_type gemma3, text_config, language_model.model.*)
    "gemma3-multimodal": _case(multimodal_gemma3_config()),
    # Mistral Small 3.x / Pixtral-style: a Mistral decoder under text_config.
    "mistral3": _case({"model_type": "mistral3", "text_config": CONFIGS["mistral"]}),
    "qwen3_moe-mxfp4": _case(CONFIGS["qwen3_moe"], mode="mxfp4", group_size=32),
    "mixtral-nvfp4": _case(CONFIGS["mixtral"], mode="nvfp4", group_size=16),
    "qwen3-mxfp8": _case(CONFIGS["qwen3"], mode="mxfp8", group_size=32, bits=8),
    "llama-8bit": _case(CONFIGS["llama"], bits=8),
}


@pytest.fixture(scope="module")
def mlx_lm_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, tuple[Path, list[list[int]]]] = {}

    def get(name: str) -> tuple[Path, list[list[int]]]:
        if name not in built:
            config, quant = CASES[name]
            out = tmp_path_factory.mktemp(name)
            vision = None
            if "text_config" in config:
                vision = {k: mx.zeros(shape, dtype) for k, (shape, dtype) in _VISION.items()}
            build_mlx_lm(out, config, extra=vision, **quant)
            built[name] = out, mlx_lm_greedy(out, PROMPTS, STEPS)
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_mlx_community_layout_decodes_as_mlx_lm(name: str, mlx_lm_checkpoint):
    """Built, quantized and saved by mlx-lm; the engine's batched, chunked greedy run (kept
    quantized, mlx-lm's kernels) gives mlx-lm's tokens, one prompt at a time."""
    path, want = mlx_lm_checkpoint(name)
    llm = LLM(str(path), keep_quantized=True, max_num_batched_tokens=24, **SMALL_KV)
    greedy = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    assert [o["token_ids"] for o in llm.generate(PROMPTS, greedy)] == want


@pytest.mark.parametrize("name", ["qwen3_moe", "granitemoe", "qwen3_moe-mxfp4", "gpt2"])
def test_mlx_community_layout_dequantized_on_cpu(name: str, mlx_lm_checkpoint):
    """The CPU default dequantizes at load (experts included): same tokens."""
    from nanovllm_mlx.models.switch import QuantizedSwitchLinear, SwitchLinear

    path, want = mlx_lm_checkpoint(name)
    llm = LLM(str(path), keep_quantized=False, **SMALL_KV)
    model = llm.engine.model_runner.model
    assert not any(isinstance(m, QuantizedSwitchLinear) for _, m in model.named_modules())
    assert ("moe" not in name) or any(isinstance(m, SwitchLinear) for _, m in model.named_modules())
    greedy = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    assert [o["token_ids"] for o in llm.generate(PROMPTS, greedy)] == want


def test_per_layer_quantization_is_kept(mlx_lm_checkpoint, monkeypatch: pytest.MonkeyPatch):
    """mlx-lm gives Qwen3-MoE's routers 8 bits next to 4-bit experts (per-layer entries in
    config.json); the engine builds each layer with its own bits and mode."""
    monkeypatch.setenv("NANOVLLM_FUSE_PROJECTIONS", "0")  # the layers as loaded, not joined
    path, _ = mlx_lm_checkpoint("qwen3_moe-mxfp4")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.gate"]["bits"] == 8
    model = LLM(str(path), keep_quantized=True, **SMALL_KV).engine.model_runner.model
    modules = dict(model.named_modules())
    gate, experts = modules["layers.0.mlp.gate"], modules["layers.0.mlp.experts.gate_proj"]
    assert (gate.bits, gate.mode) == (8, "affine")
    assert (experts.bits, experts.group_size, experts.mode) == (4, 32, "mxfp4")


def test_transformers5_qwen3_moe_matches_transformers(qwen3_moe_tiny_hf5: Path):
    """transformers 5 writes num_local_experts (num_experts is its alias) and
    rope_parameters: read through the alias, the model has all 4 experts."""
    config = json.loads((qwen3_moe_tiny_hf5 / "config.json").read_text())
    assert "num_experts" not in config and config["num_local_experts"] == 4
    check_batched_parity(qwen3_moe_tiny_hf5, PROMPTS, STEPS, max_num_batched_tokens=24)


@pytest.mark.parametrize("fixture", ["gemma3_tiny", "qwen3_moe_tiny"])
def test_save_quantized_reloads_as_written(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
):
    """save_quantized writes the module's own names (Gemma's norms already 1 + w, experts
    stacked and quantized): loaded as they are, not sanitized again."""
    src = request.getfixturevalue(fixture)
    dst = save_quantized(src, tmp_path / "q", bits=8, group_size=32, dtype="float32")
    one = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    got = LLM(str(dst), **SMALL_KV).generate(PROMPTS[:2], one)
    at_load = LLM(str(src), quantize=8, quantize_group_size=32, **SMALL_KV)
    assert [o["token_ids"] for o in got] == [
        o["token_ids"] for o in at_load.generate(PROMPTS[:2], one)
    ]


def _rewrite(src: Path, dst: Path, rename: dict[str, str]) -> Path:
    """A copy of the checkpoint in src with tensor names changed (substring -> other)."""
    import shutil

    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    tensors, metadata = mx.load(str(file), return_metadata=True)
    for old, new in rename.items():
        tensors = {k.replace(old, new): v for k, v in tensors.items()}
    mx.save_safetensors(str(file), tensors, metadata=metadata)
    return dst


def test_unknown_expert_layout_names_what_was_expected_and_found(mlx_lm_checkpoint, tmp_path):
    path, _ = mlx_lm_checkpoint("qwen3_moe")
    broken = _rewrite(path, tmp_path / "b", {".switch_mlp.": ".moe_experts."})
    with pytest.raises(CheckpointLayoutError) as e:
        LLM(str(broken), **SMALL_KV)
    message = str(e.value)
    assert "\n" not in message
    assert "'model.layers.N.mlp.experts.E.gate_proj.weight'" in message  # the Hub's
    assert "switch_mlp" in message  # mlx-community's
    assert "missing 'layers.N.mlp.experts.down_proj.weight'" in message
    assert "found 'layers.N.mlp.moe_experts.down_proj.biases'" in message


def test_fewer_experts_than_the_config_declares(qwen3_moe_tiny: Path, tmp_path: Path):
    import shutil

    dst = tmp_path / "m"
    shutil.copytree(qwen3_moe_tiny, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "num_experts": 6}))
    with pytest.raises(CheckpointLayoutError, match=r"declares 6 experts .* fewer"):
        LLM(str(dst), **SMALL_KV)


def test_multimodal_with_an_unsupported_text_model_is_refused(tmp_path: Path):
    from nanovllm_mlx.loading.loader import build_model

    with pytest.raises(ValueError, match="unsupported model_type 'llava', text model 'vicuna_x'"):
        build_model({"model_type": "llava", "text_config": {"model_type": "vicuna_x"}})


def test_short_names_of_the_new_families_are_distinct_repos():
    from nanovllm_mlx.loading import download

    names = {
        "smollm3-3b": "HuggingFaceTB/SmolLM3-3B",
        "Qwen3-30B-A3B-4bit": "mlx-community/Qwen3-30B-A3B-4bit",
        "gpt-oss-20b": "openai/gpt-oss-20b",
        "Gemma-4-E4B-IT": "google/gemma-4-E4B-it",
    }
    for name, repo in names.items():
        assert download.repo_id_for(name) == repo
    # Every short name downloads into its own directory (a 4-bit copy never overwrites the
    # float one).
    local = [download.local_name(n) for n in download.SHORT_NAMES]
    repos = set(download.SHORT_NAMES.values())
    assert len({n.lower() for n in local}) == len(repos)


def test_qwen3_moe_q4_fixture_is_mlx_community_layout(
    qwen3_moe_q4_tiny: Path, monkeypatch: pytest.MonkeyPatch
):
    """The MLX-alone twin of the lazy qwen3-30b-a3b-q4 benchmark fixture: mlx-lm reads it
    as its own (same greedy tokens), the engine keeps experts 4-bit and routers 8-bit, and
    kept-quantized logits are those of the dequantized model."""
    monkeypatch.setenv("NANOVLLM_FUSE_PROJECTIONS", "0")  # the experts as loaded, not joined
    import numpy as np
    from helpers import captured_logits

    from nanovllm_mlx.models.switch import QuantizedSwitchLinear

    want = mlx_lm_greedy(qwen3_moe_q4_tiny, PROMPTS, STEPS)
    kept = LLM(str(qwen3_moe_q4_tiny), keep_quantized=True, max_num_batched_tokens=24, **SMALL_KV)
    modules = dict(kept.engine.model_runner.model.named_modules())
    experts = [m for m in modules.values() if isinstance(m, QuantizedSwitchLinear)]
    assert len(experts) == 6 and {(m.bits, m.group_size) for m in experts} == {(4, 64)}
    assert modules["layers.1.mlp.gate"].bits == 8
    greedy = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    with captured_logits() as seen:
        got = [o["token_ids"] for o in kept.generate(PROMPTS, greedy)]
    assert got == want
    dequantized = LLM(
        str(qwen3_moe_q4_tiny), keep_quantized=False, max_num_batched_tokens=24, **SMALL_KV
    )
    with captured_logits() as again:
        assert [o["token_ids"] for o in dequantized.generate(PROMPTS, greedy)] == want
    np.testing.assert_allclose(np.concatenate(seen), np.concatenate(again), atol=1e-4, rtol=1e-4)


def test_qwen3_30b_a3b_q4_recipe_has_the_real_shapes():
    """The lazy benchmark recipe (never built by the suite): its config builds Qwen3-30B-A3B
    (30.5B parameters, 3.3B active) in the layout its builder writes."""
    import mlx.nn as nn
    from model_fixtures import mlx_community, registry

    from nanovllm_mlx.loading.loader import build_model

    recipe = registry.recipes()["qwen3-30b-a3b-q4"]
    assert not recipe.default and not recipe.uses_torch
    config = mlx_community._qwen3_moe_config(recipe.params)
    model = build_model(config)  # lazy arrays: shapes only, nothing computed
    sizes = {k: v.size for k, v in nn.utils.tree_flatten(model.parameters())}
    total = sum(sizes.values())
    expert = sum(v for k, v in sizes.items() if ".experts." in k)
    active = total - expert + expert * 8 // 128
    assert 30.4e9 < total < 30.6e9 and 3.2e9 < active < 3.4e9, (total, active)
    assert model.spec.n_layers == 48 and model.spec.n_kv_heads == 4


def _as_transformers5_names(src: Path, dst: Path) -> Path:
    """The Llava checkpoint with transformers 5's in-memory names on disk, as newer
    multimodal repos (Mistral 3, Gemma 3 re-uploads) have them: model.language_model.*,
    model.vision_tower.*, model.multi_modal_projector.*, a top-level lm_head."""
    return _rewrite(
        src,
        dst,
        {
            "language_model.model.": "model.language_model.",
            "language_model.lm_head.": "lm_head.",
            "vision_tower.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector.",
        },
    )


def test_llava_text_model_matches_transformers(llava_tiny: Path):
    """The text part of a multimodal checkpoint in the Hub layout (text_config,
    language_model.* prefixes, a vision tower left out): transformers' Llava on the same
    token ids, batched and chunked."""
    config = json.loads((llava_tiny / "config.json").read_text())
    assert config["model_type"] == "llava" and "vision_config" in config
    from transformers import LlavaForConditionalGeneration

    check_batched_parity(
        llava_tiny,
        PROMPTS,
        STEPS,
        hf_class=LlavaForConditionalGeneration,
        max_num_batched_tokens=24,
    )


def test_llava_with_transformers5_names_gives_the_same_tokens(llava_tiny: Path, tmp_path: Path):
    renamed = _as_transformers5_names(llava_tiny, tmp_path / "t5")
    greedy = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    want = LLM(str(llava_tiny), **SMALL_KV).generate(PROMPTS, greedy)
    got = LLM(str(renamed), **SMALL_KV).generate(PROMPTS, greedy)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]


@pytest.mark.parametrize("fixture", ["qwen3_moe_tiny", "mixtral_tiny"])
def test_fused_experts_on_disk_give_the_hub_layouts_tokens(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
):
    """transformers 5 holds experts fused (experts.gate_up_proj [E, 2F, D], down_proj
    [E, D, F]); its save_pretrained converts back to the Hub's per-expert names, but a
    state_dict written as it is in memory has them fused: same tokens."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src = request.getfixturevalue(fixture)
    state = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    dst = tmp_path / "fused"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    # A tied head shares the embedding's storage (safetensors refuses to write both).
    tensors = {k: v.clone().contiguous() for k, v in state.items()}
    save_file(tensors, str(dst / "model.safetensors"))
    greedy = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    want = LLM(str(src), **SMALL_KV).generate(PROMPTS, greedy)
    got = LLM(str(dst), **SMALL_KV).generate(PROMPTS, greedy)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]


def test_gemma3_multimodal_hub_checkpoint_matches_transformers(gemma3_tiny: Path, tmp_path):
    """Gemma 3 4B+'s Hub layout, saved by transformers 5's Gemma3ForConditionalGeneration
    (the gemma3-tiny text model inside, a SigLIP tower next to it): the engine serves the
    text model, = transformers' multimodal class on the same ids."""
    import shutil

    import torch
    from transformers import (
        AutoConfig,
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ForConditionalGeneration,
    )

    text = AutoConfig.from_pretrained(str(gemma3_tiny))
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 16,
    }
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config).eval()
    causal = Gemma3ForCausalLM.from_pretrained(str(gemma3_tiny), dtype=torch.float32)
    model.model.language_model.load_state_dict(causal.model.state_dict())
    out = tmp_path / "gemma3-mm"
    model.save_pretrained(out)
    for file in gemma3_tiny.glob("tokenizer*"):
        shutil.copy(file, out / file.name)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "gemma3" and saved["text_config"]["model_type"] == "gemma3_text"
    check_batched_parity(
        out, PROMPTS, STEPS, hf_class=Gemma3ForConditionalGeneration, max_num_batched_tokens=24
    )
