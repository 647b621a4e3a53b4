"""gpt-oss (models/gpt_oss.py) through the engine vs transformers, float32, in both layouts
of one set of weights: transformers 5's (float, fused experts) and OpenAI's Hub layout
(MXFP4 experts, kept in MLX's mxfp4 mode)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    REPO_ROOT,
    SMALL_KV,
    SMALL_KV_ARGS,
    captured_logits,
    check_batched_parity,
    cli_argv,
    random_ids,
    without_blas_notice,
)

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.loading.loader import build_model
from nanovllm_mlx.models.switch import QuantizedSwitchLinear, SwitchLinear

SMALL = {**SMALL_KV, "dtype": "float32"}
# Lengths: past the 32-token window and the 128-token YaRN original context, short, one
# token, and across several 16-token blocks.
PROMPTS = [random_ids(n, seed=n) for n in (140, 5, 1, 37)]
# transformers' own float32 logits differ from its float64 ones by up to 4.9e-4 on this
# fixture (YaRN's 1.14 attention factor, squared, and the sinks); ours differ from its
# float32 ones by at most 2.6e-4 (measured), so 3e-4, not the usual 1e-4.
ATOL = 3e-4


@pytest.mark.parametrize("fixture", ["gpt_oss_tiny", "gpt_oss_tiny_mxfp4"])
def test_batched_run_matches_transformers(fixture: str, request: pytest.FixtureRequest):
    """Chunked prefills sharing steps with decodes; logits of every step and the greedy
    tokens equal transformers' one prompt at a time (for the MXFP4 checkpoint transformers
    dequantizes on CPU: MXFP4 values are exact in bfloat16 and float32)."""
    path = request.getfixturevalue(fixture)
    check_batched_parity(path, PROMPTS, 8, atol=ATOL, max_num_batched_tokens=40)


def test_layers_alternate_sliding_and_full_and_declare_sinks(gpt_oss_tiny: Path):
    engine = LLM(str(gpt_oss_tiny), **SMALL).engine
    spec = engine.model_runner.model.spec
    assert spec.layer_windows == (32, None, 32, None) and spec.attention_sinks
    # Full layers see everything: no block ever leaves every layer's window.
    assert engine.block_manager.sliding_window is None


def test_mxfp4_experts_stay_quantized_and_compute_the_float_weights(
    gpt_oss_tiny: Path, gpt_oss_tiny_mxfp4: Path, monkeypatch: pytest.MonkeyPatch
):
    """The Hub's MXFP4 blocks load as MLX mxfp4 (kept quantized where asked: the default on
    a GPU); they hold exactly the float fixture's weights, so the logits agree to rounding.
    On CPU the default dequantizes them at load, to the same float weights. (Gate and up
    as loaded: a GPU would join them, models/fusion.py, which test_fusion checks.)"""
    monkeypatch.setenv("NANOVLLM_FUSE_PROJECTIONS", "0")
    one = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    # A fixed step budget (the default is measured): both runs batch the same rows.
    quantized = LLM(
        str(gpt_oss_tiny_mxfp4), max_num_batched_tokens=512, keep_quantized=True, **SMALL
    )
    model = quantized.engine.model_runner.model
    experts = [m for _, m in model.named_modules() if isinstance(m, QuantizedSwitchLinear)]
    assert len(experts) == 3 * 4 and {(m.mode, m.bits, m.group_size) for m in experts} == {
        ("mxfp4", 4, 32)
    }
    exact = LLM(str(gpt_oss_tiny), max_num_batched_tokens=512, **SMALL)
    float_model = exact.engine.model_runner.model
    floats = dict(nn.utils.tree_flatten(float_model.parameters()))
    for path, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear):
            w = mx.dequantize(m.weight, m.scales, None, 32, 4, mode="mxfp4", dtype=mx.float32)
            assert mx.array_equal(w, floats[f"{path}.weight"]), path
            assert mx.array_equal(m.bias, floats[f"{path}.bias"]), path
    assert not any(isinstance(m, SwitchLinear) for _, m in model.named_modules())
    assert quantized.engine.quantization == "kept quantized"
    if mx.default_device() == mx.cpu:
        default = LLM(str(gpt_oss_tiny_mxfp4), max_num_batched_tokens=512, **SMALL)
        params = dict(nn.utils.tree_flatten(default.engine.model_runner.model.parameters()))
        assert default.engine.quantization == "dequantized to float32 at load"
        for path, m in model.named_modules():
            if isinstance(m, QuantizedSwitchLinear):
                assert mx.array_equal(params[f"{path}.weight"], floats[f"{path}.weight"]), path
                assert mx.array_equal(params[f"{path}.bias"], floats[f"{path}.bias"]), path
    with captured_logits() as seen:
        got = quantized.generate(PROMPTS, one)
    with captured_logits() as want:
        expected = exact.generate(PROMPTS, one)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
    for a, b in zip(seen, want):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_preemption_give_the_same_tokens(gpt_oss_tiny: Path):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [random_ids(n, seed=100 + n) for n in (60, 45, 30, 75, 20, 50)]
    expected = [o["token_ids"] for o in LLM(str(gpt_oss_tiny), **SMALL).generate(prompts, params)]
    chunked = LLM(str(gpt_oss_tiny), max_num_batched_tokens=16, **SMALL)
    assert [o["token_ids"] for o in chunked.generate(prompts, params)] == expected
    # 16 blocks of 16 tokens hold about two and a half of these ~70-token sequences.
    spec = chunked.engine.model_runner.model.spec
    block_bytes = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 16 * 4
    tight = LLM(
        str(gpt_oss_tiny), kv_cache_gb=16 * block_bytes / 2**30, max_model_len=128, dtype="float32"
    )
    assert tight.engine.block_manager.num_blocks == 16
    assert [o["token_ids"] for o in tight.generate(prompts, params)] == expected
    assert tight.stats()["preemptions"] > 0


def test_prefix_cache_hits_give_the_same_tokens(gpt_oss_tiny: Path):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prefix = random_ids(70, seed=7)  # past the window: sliding layers read cached blocks
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    cold = LLM(str(gpt_oss_tiny), enable_prefix_caching=False, **SMALL)
    expected = cold.generate([second], params)[0]["token_ids"]
    warm = LLM(str(gpt_oss_tiny), **SMALL)
    warm.generate([first], params)
    out = warm.generate([second], params)[0]
    assert out["num_cached_tokens"] == 64
    assert out["token_ids"] == expected


def test_tensor_parallelism_is_refused_in_one_line(gpt_oss_tiny: Path):
    argv = cli_argv("ask", "-m", str(gpt_oss_tiny), *SMALL_KV_ARGS, "-tp", "2", "Hi")
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert without_blas_notice(proc.stderr).splitlines() == [
        "error: tensor parallelism is not implemented for gpt_oss (its experts and "
        "attention sinks are not split across ranks): run it with --tensor-parallel-size 1"
    ], proc.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 must be in"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok 0 must be in"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries for 4 layers"),
        ({"layer_types": ["chunked_attention"] * 4}, "unsupported attention layer type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_bad_configs_are_clear_errors(change: dict, message: str, gpt_oss_tiny: Path):
    config = json.loads((gpt_oss_tiny / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_config_aliases_and_defaults(gpt_oss_tiny_mxfp4: Path):
    """OpenAI's `experts_per_token` and transformers' `num_experts` alias are read; a
    config without rope scaling gets transformers' default YaRN, without layer_types the
    alternation starting with a sliding layer."""
    config = json.loads((gpt_oss_tiny_mxfp4 / "config.json").read_text())
    for key in ("num_experts_per_tok", "num_local_experts", "rope_scaling", "layer_types"):
        config.pop(key)
    model = build_model({**config, "num_experts": 4, "experts_per_token": 3})
    assert model.args.num_local_experts == 4 and model.args.num_experts_per_tok == 3
    assert model.args.rope_scaling["factor"] == 32.0
    assert model.spec.layer_windows == (32, None, 32, None)


def test_mlx_community_layout_decodes_as_mlx_lm(gpt_oss_tiny_mxfp4: Path, tmp_path: Path):
    """mlx-community's gpt-oss repos are what mlx-lm writes after its own sanitize (gate
    and up split, mlx-lm's names): MXFP4 experts and, as in the MXFP4-Q8 repos, the other
    layers 8-bit affine. Built here with mlx-lm's own classes from the Hub fixture; the
    engine's greedy tokens equal mlx-lm's."""
    import shutil

    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load, save_model

    reference, _, config = load(str(gpt_oss_tiny_mxfp4), return_config=True)
    for layer in reference.layers:
        # mlx-lm fixes swiglu_limit at gpt-oss's 7.0 and ignores the config's; this
        # fixture's is 2.0, so that its clamps act.
        layer.mlp.experts.activation._limit = config["swiglu_limit"]
    nn.quantize(
        reference,
        group_size=64,
        bits=8,
        class_predicate=lambda _, m: (
            isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % 64 == 0
        ),
    )
    save_model(tmp_path, reference)
    quantized = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    for path, m in reference.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized[path] = {"group_size": 64, "bits": 8, "mode": "affine"}
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    # mlx-lm's YaRN always rounds its correction range outwards (truncate true), which
    # gpt-oss's truncate false does not (transformers and this engine follow the flag): the
    # saved config says what mlx-lm computes, so both sides rotate alike.
    config["rope_scaling"] = {**config["rope_scaling"], "truncate": True}
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": quantized}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gpt_oss_tiny_mxfp4 / name, tmp_path / name)
    llm = LLM(str(tmp_path), keep_quantized=True, **SMALL)
    kinds = {type(m).__name__ for _, m in llm.engine.model_runner.model.named_modules()}
    assert "QuantizedSwitchLinear" in kinds  # the experts stay mxfp4, as on a GPU
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        steps = generate_step(mx.array(prompt), reference, max_tokens=8)
        assert out["token_ids"] == [int(t) for t, _ in steps]


def _ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The Hub's MXFP4 (codes 2k, 2k + 1 in byte k) -> ggml's blocks [exponent, 16 bytes
    with code j low and j + 16 high], as llama.cpp's converter repacks them."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    packed = np.concatenate([scales[..., None], qs], axis=-1).astype(np.uint8)
    return packed.reshape(*packed.shape[:-2], -1)


def test_gguf_in_llama_cpps_layout_equals_the_hub_checkpoint(
    gpt_oss_tiny_mxfp4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A GGUF as llama.cpp's converter writes gpt-oss (arch `gpt-oss`, experts MXFP4 with
    gate and up split, sinks as attn_sinks, the router as ffn_gate_inp, YaRN keys): the
    engine's logits equal those of the Hub checkpoint, experts staying mxfp4. The file
    has no swiglu_limit (llama.cpp fixes it at 7.0), so the reference gets 7.0 too."""
    import shutil

    from gguf_files import write_gguf
    from safetensors.numpy import load_file

    config = json.loads((gpt_oss_tiny_mxfp4 / "config.json").read_text())
    hub = load_file(str(gpt_oss_tiny_mxfp4 / "model.safetensors"))
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.router": "ffn_gate_inp",
    }
    tensors, quant = {}, {}
    for key, value in hub.items():
        stem, _, suffix = key.removeprefix("model.").rpartition(".")
        if not stem.startswith("layers."):
            name = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
            tensors[f"{name[stem]}.{suffix}"] = value
            continue
        _, n, rest = stem.split(".", 2)
        if rest == "self_attn" and suffix == "sinks":
            tensors[f"blk.{n}.attn_sinks.weight"] = value
        elif rest == "mlp.experts":
            if suffix.endswith("_scales"):
                continue
            proj = suffix.removesuffix("_blocks").removesuffix("_bias")
            if suffix.endswith("_blocks"):
                value = _ggml_mxfp4(value, hub[key.replace("_blocks", "_scales")])
            parts = {"down": value} if proj == "down_proj" else {
                "gate": value[:, ::2], "up": value[:, 1::2]
            }  # fmt: skip
            for part, v in parts.items():
                kind = "bias" if suffix.endswith("_bias") else "weight"
                name = f"blk.{n}.ffn_{part}_exps.{kind}"
                tensors[name] = np.ascontiguousarray(v)
                if kind == "weight":
                    quant[name] = "raw-mxfp4"
        else:
            tensors[f"blk.{n}.{names[rest]}.{suffix}"] = value
    rope = config["rope_scaling"]
    extra = {
        "attention.key_length": config["head_dim"],
        "attention.value_length": config["head_dim"],
        "expert_count": config["num_local_experts"],
        "expert_used_count": config["num_experts_per_tok"],
        "expert_feed_forward_length": config["intermediate_size"],
        "attention.sliding_window": config["sliding_window"],
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": float(rope["factor"]),
        "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
    }
    reference = tmp_path / "hub"
    shutil.copytree(gpt_oss_tiny_mxfp4, reference)
    changed = {"swiglu_limit": 7.0, "bos_token_id": config["eos_token_id"]}
    (reference / "config.json").write_text(json.dumps({**config, **changed}))
    path = write_gguf(tmp_path / "g.gguf", reference, "gpt-oss", tensors, quant, extra)
    monkeypatch.setenv("NANOVLLM_FUSE_PROJECTIONS", "0")  # count the experts as loaded
    llm = LLM(str(path), keep_quantized=True, **SMALL)  # as on a GPU: CPU dequantizes
    experts = [m for _, m in llm.engine.model_runner.model.named_modules()]
    assert sum(isinstance(m, QuantizedSwitchLinear) and m.mode == "mxfp4" for m in experts) == 12
    np.testing.assert_allclose(_logits(path), _logits(reference), atol=1e-4, rtol=1e-4)


def _logits(path: Path) -> np.ndarray:
    """Every sampled row's logits over PROMPTS, 4 greedy steps, under a fixed step budget
    (the default is measured, and another chunking rounds differently)."""
    llm = LLM(str(path), max_num_batched_tokens=512, **SMALL)
    with captured_logits() as seen:
        llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    return np.concatenate(seen)
