"""GGUF files of Qwen3.5 (dense and MoE) and Qwen3-Next, written here from the tiny
fixtures the way llama.cpp's convert_hf_to_gguf.py writes them: names from gguf-py's own
tensor map, A_log as -exp(A_log), dt_bias as ssm_dt.bias, conv1d squeezed to [C, K], norms
(but the gated one) as 1 + w, experts stacked, and for Qwen3.5 the value heads reordered
from grouped by key head to tiled (the fixtures have two value heads per key head, so that
reordering is exercised). The engine reading them gives the safetensors checkpoint's
logits and greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf_files import engine_logits, write_gguf
from helpers import random_ids

from nanovllm_mlx import LLM

ARCHES = {"qwen35-tiny": "qwen35", "qwen35-moe-tiny": "qwen35moe", "qwen3-next-tiny": "qwen3next"}


def _tiled(x: np.ndarray, hk: int, axis: int = 0) -> np.ndarray:
    """Value heads from grouped by key head to llama.cpp's tiled order, along `axis`."""
    x = np.moveaxis(x, axis, 0)
    shape = x.shape
    x = x.reshape(hk, shape[0] // hk, -1).swapaxes(0, 1).reshape(shape)
    return np.moveaxis(x, 0, axis)


def _converted(model_dir: Path, arch: str) -> dict[str, np.ndarray]:
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    hk = config["linear_num_key_heads"]
    key_dim = hk * config["linear_key_head_dim"]
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    # The Qwen3-Next fixture's dense layer (mlp_only_layers; real checkpoints have none)
    # has no name in llama.cpp's qwen3next: it goes under the generic ffn_* names.
    dense = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, layers)
    tile = arch != "qwen3next"
    experts: dict[str, dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for key, value in load_file(str(model_dir / "model.safetensors")).items():
        value = value.astype(np.float32)
        if ".mlp.experts." in key:  # model.layers.N.mlp.experts.E.proj.weight -> stacked
            parts = key.split(".")
            stacked = ".".join([*parts[:-3], parts[-2], "weight"])
            experts.setdefault(stacked, {})[int(parts[-3])] = value
            continue
        if key.endswith(".A_log"):
            value = -np.exp(value)
        elif key.endswith(".dt_bias"):
            key = key.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif "conv1d" in key:
            value = value.squeeze(1)
        elif key.endswith("norm.weight") and not key.endswith("linear_attn.norm.weight"):
            value = value + 1.0
        if tile and ".linear_attn." in key:
            kind = key.removesuffix(".weight").removesuffix(".bias").split(".")[-1]
            if kind in ("in_proj_z", "in_proj_b", "in_proj_a", "A_log", "dt_proj"):
                value = _tiled(value, hk)
            elif kind in ("in_proj_qkv", "conv1d"):
                value = np.concatenate([value[: 2 * key_dim], _tiled(value[2 * key_dim :], hk)])
            elif kind == "out_proj":
                value = _tiled(value, hk, axis=1)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        name = name or dense.get_name(key, try_suffixes=(".weight",))
        assert name is not None, key
        out[name] = np.ascontiguousarray(value)
    for key, by_expert in experts.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        out[name] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def _metadata(config: dict, arch: str) -> dict[str, int | float]:
    layer_types = config["layer_types"]
    extra: dict[str, int | float] = {
        "attention.key_length": config["head_dim"],
        "attention.value_length": config["head_dim"],
        "rope.dimension_count": int(
            config["head_dim"] * config["rope_parameters"]["partial_rotary_factor"]
        ),
        "ssm.conv_kernel": config["linear_conv_kernel_dim"],
        "ssm.state_size": config["linear_key_head_dim"],
        "ssm.group_count": config["linear_num_key_heads"],
        "ssm.time_step_rank": config["linear_num_value_heads"],
        "ssm.inner_size": config["linear_value_head_dim"] * config["linear_num_value_heads"],
        "full_attention_interval": layer_types.index("full_attention") + 1,
    }
    if arch != "qwen35":
        extra.update(
            expert_count=config["num_experts"],
            expert_used_count=config["num_experts_per_tok"],
            expert_feed_forward_length=config["moe_intermediate_size"],
            expert_shared_feed_forward_length=config["shared_expert_intermediate_size"],
        )
    return extra


@pytest.mark.parametrize("fixture", list(ARCHES))
def test_gguf_in_llama_cpps_layout_equals_the_safetensors(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
):
    model_dir: Path = request.getfixturevalue(fixture.replace("-", "_"))
    arch = ARCHES[fixture]
    config = json.loads((model_dir / "config.json").read_text())
    tensors = _converted(model_dir, arch)
    path = write_gguf(tmp_path / "m.gguf", model_dir, arch, tensors, extra=_metadata(config, arch))
    prompt = random_ids(7, seed=3)
    got, want = engine_logits(path, prompt), engine_logits(model_dir, prompt)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_a_gguf_without_the_linear_attention_sizes_is_refused(qwen35_tiny: Path, tmp_path: Path):
    config = json.loads((qwen35_tiny / "config.json").read_text())
    extra = _metadata(config, "qwen35")
    del extra["ssm.group_count"]
    path = write_gguf(
        tmp_path / "m.gguf", qwen35_tiny, "qwen35", _converted(qwen35_tiny, "qwen35"), extra=extra
    )
    with pytest.raises(ValueError, match="lacks qwen35.ssm.group_count"):
        LLM(str(path))


def test_a_qwen3_next_gguf_with_split_projections_is_refused(qwen3_next_tiny: Path, tmp_path: Path):
    """Which order such a file's value heads are in is unverified: a clear error naming the
    tensor, not wrong logits."""
    config = json.loads((qwen3_next_tiny / "config.json").read_text())
    tensors = _converted(qwen3_next_tiny, "qwen3next")
    tensors["blk.0.attn_qkv.weight"] = tensors.pop("blk.0.ssm_in.weight")
    extra = _metadata(config, "qwen3next")
    path = write_gguf(tmp_path / "m.gguf", qwen3_next_tiny, "qwen3next", tensors, extra=extra)
    with pytest.raises(ValueError, match="unexpected GGUF tensor 'blk.0.attn_qkv.weight'"):
        LLM(str(path))
