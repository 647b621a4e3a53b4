"""Gemma 4 text (models/gemma4.py) through the engine vs transformers, float32, on a
fixture with every Gemma 4 feature on (tests/model_fixtures/gemma4.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import (
    REPO_ROOT,
    SMALL_KV,
    SMALL_KV_ARGS,
    check_batched_parity,
    cli_argv,
    random_ids,
    without_blas_notice,
)

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.loading.loader import build_model

SMALL = {**SMALL_KV, "dtype": "float32"}
# Past the 32-token window, short, one token, several 16-token blocks.
PROMPTS = [random_ids(n, seed=n) for n in (70, 5, 1, 37)]


def test_batched_run_matches_transformers(gemma4_tiny: Path):
    check_batched_parity(gemma4_tiny, PROMPTS, 8, max_num_batched_tokens=40)


def test_pools_fit_the_widest_layer_and_shared_layers_read_their_producers(gemma4_tiny: Path):
    engine = LLM(str(gemma4_tiny), **SMALL).engine
    model = engine.model_runner.model
    # Global layers: heads of 32 and one KV head; sliding ones 16 and two: pools of (2, 32).
    assert (model.spec.n_kv_heads, model.spec.head_dim) == (2, 32)
    assert model.spec.layer_windows == (32, 32, None) * 2
    assert model.kv_sources == [0, 1, 2, 3, 3, 2]
    # KV-shared layers hold no key/value weights; global layers no v_proj (keys are values).
    names = {k for k, _ in model.parameters()["layers"][4]["self_attn"].items()}
    assert names == {"q_proj", "q_norm", "o_proj"}
    assert "v_proj" not in model.parameters()["layers"][2]["self_attn"]


def test_chunked_prefill_preemption_and_prefix_hits_give_the_same_tokens(gemma4_tiny: Path):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [random_ids(n, seed=200 + n) for n in (60, 45, 30, 75, 20, 50)]
    base = LLM(str(gemma4_tiny), enable_prefix_caching=False, **SMALL)
    expected = [o["token_ids"] for o in base.generate(prompts, params)]
    assert len({t for out in expected for t in out}) > 40  # the layers decide, not the prompt
    chunked = LLM(str(gemma4_tiny), max_num_batched_tokens=16, **SMALL)
    assert [o["token_ids"] for o in chunked.generate(prompts, params)] == expected
    spec = chunked.engine.model_runner.model.spec
    block_bytes = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 16 * 4
    tight = LLM(
        str(gemma4_tiny), kv_cache_gb=16 * block_bytes / 2**30, max_model_len=128, dtype="float32"
    )
    assert tight.engine.block_manager.num_blocks == 16
    assert [o["token_ids"] for o in tight.generate(prompts, params)] == expected
    assert tight.stats()["preemptions"] > 0
    # A second run of prompts that share a 64-token prefix with the first ones.
    again = [p[:64] + [7, 8, 9] for p in prompts if len(p) >= 64]
    cold = [o["token_ids"] for o in base.generate(again, params)]
    warm = chunked.generate(again, params)
    assert [o["token_ids"] for o in warm] == cold
    assert all(o["num_cached_tokens"] == 64 for o in warm)


def test_multimodal_checkpoint_loads_its_text_model(gemma4_tiny: Path, tmp_path: Path):
    """A `gemma4` checkpoint: the text config under text_config, the weights under
    model.language_model., and towers the engine skips."""
    import shutil

    config = json.loads((gemma4_tiny / "config.json").read_text())
    wrapped = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps({**wrapped, "text_config": config}))
    weights = mx.load(str(gemma4_tiny / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    renamed["model.vision_tower.encoder.weight"] = mx.zeros((2, 2))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), renamed, metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gemma4_tiny / name, tmp_path / name)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [o["token_ids"] for o in LLM(str(gemma4_tiny), **SMALL).generate(PROMPTS, params)]
    assert [o["token_ids"] for o in LLM(str(tmp_path), **SMALL).generate(PROMPTS, params)] == want


def test_tensor_parallelism_is_refused_in_one_line(gemma4_tiny: Path):
    argv = cli_argv("ask", "-m", str(gemma4_tiny), *SMALL_KV_ARGS, "-tp", "2", "Hi")
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert without_blas_notice(proc.stderr).splitlines() == [
        "error: tensor parallelism is not implemented for nanovllm_mlx.models.gemma4: run it "
        "with --tensor-parallel-size 1"
    ], proc.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_activation": "relu"}, "activation"),
        ({"use_bidirectional_attention": "all"}, "bidirectional"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries for 6 layers"),
        ({"num_kv_shared_layers": 6}, "num_kv_shared_layers 6 must be in"),
        ({"num_kv_shared_layers": 5}, "has no earlier full_attention layer"),
        ({"top_k_experts": None}, "enable_moe_block needs"),
        ({"per_layer_config": {"2": {"num_key_value_heads": 3}}}, "not a multiple"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}},
            "rope type 'yarn'",
        ),
    ],
)
def test_bad_configs_are_clear_errors(change: dict, message: str, gemma4_tiny: Path):
    config = json.loads((gemma4_tiny / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_mlx_community_layout_decodes_as_mlx_lm(gemma4_tiny: Path, tmp_path: Path):
    """What `mlx_lm.convert -q` writes (mlx-lm's names, `experts.switch_glu`, 4-bit affine
    where the widths split into groups of 32), built with mlx-lm's own classes; the
    engine's greedy tokens equal mlx-lm's. mlx-lm reads the global layers' shape from
    global_head_dim / num_global_key_value_heads, which Google's configs carry and
    transformers replaces by per_layer_config when it saves: both are given here."""
    import shutil

    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load, quantize_model, save_config, save_model

    source = tmp_path / "hf"
    shutil.copytree(gemma4_tiny, source)
    config = json.loads((source / "config.json").read_text())
    config.update(global_head_dim=32, num_global_key_value_heads=1)
    (source / "config.json").write_text(json.dumps(config))
    reference, _, config = load(str(source), return_config=True)
    reference, config = quantize_model(reference, config, group_size=32, bits=4)
    out = tmp_path / "mlx"
    save_model(out, reference)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    llm = LLM(str(out), **SMALL)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for prompt, got in zip(PROMPTS, llm.generate(PROMPTS, params)):
        steps = generate_step(mx.array(prompt), reference, max_tokens=8)
        assert got["token_ids"] == [int(t) for t, _ in steps]
