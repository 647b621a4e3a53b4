"""DeepSeek-V3 through the engine: multi-head latent attention on a latent paged cache and
group-routed experts, against transformers on a random-weight checkpoint in the Hub
layout (tests/model_fixtures/deepseek_v3.py), and what the engine does to a sequence
(chunks, preemption, prefix hits, compiled decode) leaving its tokens unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import REPO_ROOT, check_batched_parity, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention.kv_quant import resolve
from nanovllm_mlx.engine.runner import memory
from nanovllm_mlx.loading.loader import build_model, read_config
from nanovllm_mlx.models import deepseek_v3

# transformers' own float32 logits on this fixture differ from its float64 ones by up to
# 2.3e-4 (the builder's log): the engine is held to a few times that, not to 1e-4.
ATOL = 5e-4
PROMPTS = [random_ids(n, seed=n) for n in (70, 5, 1, 37)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SMALL = {"kv_cache_gb": 0.02, "dtype": "float32"}


def test_batched_run_matches_transformers(deepseek_v3_tiny: Path):
    """Prefill and every decode step's logits and the greedy tokens of four prompts run as
    one continuous batch with chunked prefills, each against transformers alone."""
    check_batched_parity(deepseek_v3_tiny, PROMPTS, 8, atol=ATOL, max_num_batched_tokens=40)


def test_the_cache_holds_the_latent_alone(deepseek_v3_tiny: Path):
    llm = LLM(str(deepseek_v3_tiny), **SMALL)
    runner = llm.engine.model_runner
    spec = runner.model.spec
    # kv_lora_rank 32 + rope 8 per token and layer; no V pool.
    assert (spec.n_kv_heads, spec.head_dim, spec.latent_value_dim) == (1, 40, 32)
    assert all(c.v is None and c.k.shape[0] == 1 and c.k.shape[2] == 40 for c in runner.caches)
    per_block = memory.kv_bytes_per_block(spec, 16, (resolve("auto", mx.float32),) * 2)
    assert per_block == 3 * 16 * 40 * 4
    # Expanded, each of the 4 heads would cache a 24-dim key and a 16-dim value.
    assert 3 * 16 * 4 * (24 + 16) * 4 == 4 * per_block


def test_chunks_preemption_prefix_hits_and_compiled_decode_keep_the_tokens(
    deepseek_v3_tiny: Path,
):
    prompts = [random_ids(n, seed=100 + n) for n in (45, 23, 61, 9, 30, 52)]
    base = LLM(str(deepseek_v3_tiny), enable_prefix_caching=False, **SMALL)
    expected = [o["token_ids"] for o in base.generate(prompts, GREEDY)]

    chunked = LLM(str(deepseek_v3_tiny), max_num_batched_tokens=16, **SMALL)
    assert [o["token_ids"] for o in chunked.generate(prompts, GREEDY)] == expected

    # 10 blocks of 16 tokens (3 layers x 40 floats a token): room for ~2 of these at once.
    per_block = 3 * 16 * 40 * 4
    tight = LLM(
        str(deepseek_v3_tiny), kv_cache_gb=10 * per_block / 2**30, max_model_len=80, dtype="float32"
    )
    assert tight.engine.block_manager.num_blocks == 10
    assert [o["token_ids"] for o in tight.generate(prompts, GREEDY)] == expected
    assert tight.stats()["preemptions"] > 0

    # A second prompt sharing the first's 48-token prefix reads 3 cached blocks.
    warm = LLM(str(deepseek_v3_tiny), **SMALL)
    prefix = random_ids(48, seed=7)
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    cold = base.generate([second], GREEDY)[0]["token_ids"]
    warm.generate([first], GREEDY)
    out = warm.generate([second], GREEDY)[0]
    assert out["num_cached_tokens"] == 48
    assert out["token_ids"] == cold

    # Compiled decode steps carry the latent pools (and no V pools) through mx.compile.
    compiled = LLM(str(deepseek_v3_tiny), compile_decode=True, **SMALL)
    assert [o["token_ids"] for o in compiled.generate(prompts[:3], GREEDY)] == expected[:3]
    assert compiled.engine.model_runner.decode_buckets


def test_a_tensor_parallel_size_that_does_not_divide_is_one_error(deepseek_v3_tiny: Path):
    """Two ranks run (tests/test_tensor_parallel.py); three do not divide the 4 heads."""
    code = (
        "import nanovllm_mlx; from nanovllm_mlx import LLM\n"
        f"LLM({str(deepseek_v3_tiny)!r}, kv_cache_gb=0.02, tensor_parallel_size=3)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    message = "tensor_parallel_size 3 does not divide the model's attention_heads (4)"
    assert message in proc.stderr


def _router_case(n_group: int, topk_group: int, k: int, normalize: bool) -> dict:
    return {
        "hidden_size": 16,
        "n_routed_experts": 16,
        "num_experts_per_tok": k,
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": normalize,
        "routed_scaling_factor": 2.5,
    }


@pytest.mark.parametrize(
    "case",
    [
        _router_case(4, 2, 4, True),  # V3's shape: groups, top-2-per-group scoring
        _router_case(8, 3, 3, False),  # unnormalized weights
        _router_case(1, 1, 6, True),  # Kimi-K2: one group
        _router_case(4, 4, 1, True),  # every group kept; top-1 renormalizes to 1
    ],
)
def test_router_matches_transformers(case: dict):
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(**case)
    theirs = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=g))
        theirs.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.5)
    x = torch.randn(64, 16, generator=g)
    _, want_w, want_i = theirs(x)
    args = deepseek_v3.ModelArgs.from_dict({**case, "num_attention_heads": 4})
    ours = deepseek_v3.Router(args)
    ours.weight = mx.array(theirs.weight.detach().numpy())
    ours.e_score_correction_bias = mx.array(theirs.e_score_correction_bias.numpy())
    indices, weights = (np.array(a) for a in ours(mx.array(x.numpy())))
    for row in range(64):  # the same experts with the same weights, in any order
        mine = dict(zip(indices[row].tolist(), weights[row].tolist()))
        ref = dict(zip(want_i[row].tolist(), want_w[row].detach().tolist()))
        assert mine.keys() == ref.keys(), f"row {row}"
        np.testing.assert_allclose([mine[e] for e in ref], list(ref.values()), rtol=1e-5)


def test_a_transformers_5_config_reads_as_the_hub_one(deepseek_v3_tiny: Path):
    """transformers 5 writes rope_parameters (and may write the num_local_experts alias)
    where the Hub config has rope_scaling + rope_theta and n_routed_experts."""
    from transformers import AutoConfig

    hub = read_config(deepseek_v3_tiny)
    hf5 = AutoConfig.from_pretrained(deepseek_v3_tiny).to_dict()
    assert "rope_parameters" in hf5 and "rope_scaling" not in hf5
    hf5["num_local_experts"] = hf5.pop("n_routed_experts")
    a, b = (deepseek_v3.ModelArgs.from_dict(c) for c in (hub, hf5))
    assert b.n_routed_experts == a.n_routed_experts == 8
    assert b.rope_scaling is not None and a.rope_scaling is not None
    assert b.rope_scaling["factor"] == a.rope_scaling["factor"] == 4.0
    assert b.rope_scaling["mscale_all_dim"] == 0.8
    assert (b.q_lora_rank, b.kv_lora_rank, b.n_group) == (a.q_lora_rank, a.kv_lora_rank, 4)


def test_sanitize_drops_multi_token_prediction_layers(deepseek_v3_tiny: Path):
    model = build_model(read_config(deepseek_v3_tiny))
    weights = {
        "model.layers.3.eh_proj.weight": mx.zeros((4, 8)),  # MTP layer past the 3 layers
        "model.layers.3.self_attn.kv_b_proj.weight": mx.zeros((4, 8)),
        "model.norm.weight": mx.zeros((64,)),
    }
    assert model.sanitize(weights).keys() == {"norm.weight"}


def _fp8_copy(source: Path, out: Path, block: int) -> dict:
    """The fixture as DeepSeek's FP8 release stores itself: every linear weight of the
    decoder layers in float8 e4m3 with one float32 scale per block x block tile
    (weight_scale_inv), the rest as it was. Returns the weights those tiles decode to."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    tensors = load_file(str(source / "model.safetensors"))
    decoded = {}
    for name, w in list(tensors.items()):
        if not (name.startswith("model.layers.") and w.ndim == 2 and ".gate." not in name):
            continue
        rows, cols = w.shape
        tiles = torch.nn.functional.pad(w, (0, -cols % block, 0, -rows % block))
        tiles = tiles.reshape(tiles.shape[0] // block, block, tiles.shape[1] // block, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
        fp8 = (w / full).to(torch.float8_e4m3fn)
        tensors[name], tensors[f"{name}_scale_inv"] = fp8, scale
        decoded[name] = (fp8.float() * full).to(torch.bfloat16).float()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [block, block],
    }
    (out / "config.json").write_text(json.dumps(config))
    return decoded


def test_fp8_release_layout_loads_its_decoded_weights(deepseek_v3_tiny: Path, tmp_path: Path):
    """DeepSeek's own FP8 checkpoints: e4m3 weights and per-tile scales (32 x 32 here, so
    that 48- and 40-row projections end in partial tiles) load as the weights they decode
    to, and generate."""
    import mlx.nn as nn

    from nanovllm_mlx.loading import loader

    decoded = _fp8_copy(deepseek_v3_tiny, tmp_path / "fp8", 32)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in decoded
    model = loader.load(str(tmp_path / "fp8"), loader.LoadOptions(dtype="float32")).model
    params = dict(nn.utils.tree_flatten(model.parameters()))
    want = decoded["model.layers.0.self_attn.q_a_proj.weight"].numpy()
    np.testing.assert_array_equal(np.array(params["layers.0.self_attn.q_a_proj.weight"]), want)
    experts = np.array(params["layers.2.mlp.switch_mlp.down_proj.weight"])
    np.testing.assert_array_equal(
        experts[5], decoded["model.layers.2.mlp.experts.5.down_proj.weight"].numpy()
    )
    llm = LLM(str(tmp_path / "fp8"), **SMALL)
    assert len(llm.generate([PROMPTS[0]], GREEDY)[0]["token_ids"]) == 12


def test_fp8_scales_that_do_not_fit_are_refused(deepseek_v3_tiny: Path):
    model = build_model(read_config(deepseek_v3_tiny))
    name = "model.layers.0.self_attn.q_a_proj.weight"
    cases = [
        ({name: mx.zeros((200, 64), dtype=mx.uint8)}, r"scales \(1, 1\) does not fit"),
        ({name: mx.zeros((48, 64))}, r"\(mlx.core.float32\) with scales"),  # not FP8
        ({}, "has no FP8 weight"),
    ]
    for weights, message in cases:
        with pytest.raises(ValueError, match=message):
            model.sanitize({**weights, f"{name}_scale_inv": mx.ones((1, 1))})


def test_null_routed_experts_is_a_dense_model(deepseek_v3_tiny: Path):
    config = {**read_config(deepseek_v3_tiny), "n_routed_experts": None, "n_group": 3}
    model = build_model(config)
    assert not any(isinstance(layer.mlp, deepseek_v3.MoE) for layer in model.layers)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"n_group": 3}, "must divide n_routed_experts"),
        ({"topk_group": 5}, "topk_group 5 lie in"),
        ({"n_group": 8}, "fewer than 2 a group"),
        ({"num_experts_per_tok": 5, "topk_group": 2}, "num_experts_per_tok 5"),
        ({"scoring_func": "softmax"}, "unsupported DeepSeek router"),
        ({"topk_method": "group_limited_greedy"}, "unsupported DeepSeek router"),
    ],
)
def test_bad_router_configs_are_clear_errors(deepseek_v3_tiny: Path, change: dict, message: str):
    config = {**read_config(deepseek_v3_tiny), **change}
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_plain_query_projection_and_other_routing_matches_transformers(tmp_path: Path):
    """q_lora_rank null (DeepSeek-V2-Lite's plain q_proj), two shared experts, every layer
    sparse, one expert group, unnormalized weights, unscaled rope: the other branches."""
    from model_fixtures import registry
    from model_fixtures.deepseek_v3 import build_deepseek_v3
    from model_fixtures.weights import build_environment

    params = {
        **registry.recipes()["deepseek-v3-tiny"].params,
        "q_lora_rank": None,
        "n_shared_experts": 2,
        "first_k_dense_replace": 0,
        "n_group": 1,
        "topk_group": 1,
        "rope_scaling": None,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "num_hidden_layers": 2,
        "seed": 6711,
    }
    path = tmp_path / "scratch-deepseek-v3-variant-0"  # the builder's scratch naming
    path.mkdir()
    with build_environment():
        build_deepseek_v3(path, params)
    model = build_model(read_config(path))
    attention, moe = model.layers[0].self_attn, model.layers[0].mlp
    assert "q_proj" in attention and "q_a_proj" not in attention
    assert isinstance(moe, deepseek_v3.MoE) and moe.shared_experts.up_proj.weight.shape == (64, 64)
    check_batched_parity(path, PROMPTS[:2], 4, atol=ATOL)


def test_the_router_stays_float32_in_a_half_precision_model(deepseek_v3_tiny: Path):
    import mlx.nn as nn

    from nanovllm_mlx.loading import loader

    # Loaded, not run: MLX's CPU gather_mm, which every MoE here runs, is float32 only.
    model = loader.load(str(deepseek_v3_tiny), loader.LoadOptions(dtype="bfloat16")).model
    params = dict(nn.utils.tree_flatten(model.parameters()))
    router = {k for k in params if ".mlp.gate." in k}
    assert router == {
        f"layers.{i}.mlp.gate.{name}"
        for i in (1, 2)
        for name in ("weight", "e_score_correction_bias")
    }
    assert all(params[k].dtype == mx.float32 for k in router)
    assert all(p.dtype == mx.bfloat16 for k, p in params.items() if k not in router)


def test_mlx_community_checkpoint_decodes_as_mlx_lm(deepseek_v3_q4_tiny: Path):
    """mlx-lm's DeepSeek-V3, random weights, quantized and saved by mlx-lm as mlx_lm.convert
    -q does: the engine loads it as it is (switch_mlp experts, quantized unembed_out) and
    its batched logits and greedy tokens are mlx-lm's, each prompt alone."""
    import mlx.nn as nn
    from helpers import captured_logits_by_seq
    from mlx_lm.utils import load_model

    from nanovllm_mlx.models.mla import QuantizedMultiLinear
    from nanovllm_mlx.models.switch import QuantizedSwitchLinear

    llm = LLM(str(deepseek_v3_q4_tiny), max_num_batched_tokens=40, **SMALL)
    kinds = {type(m) for _, m in llm.engine.model_runner.model.named_modules()}
    # On CPU the loader dequantizes linear layers and experts (MLX's CPU quantized matmul
    # is the slow path); the latent projections stay quantized.
    assert QuantizedMultiLinear in kinds
    if mx.default_device() == mx.cpu:
        assert QuantizedSwitchLinear not in kinds and nn.QuantizedLinear not in kinds
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with captured_logits_by_seq() as seen:
        outs = llm.generate(PROMPTS, greedy)
    theirs, _ = load_model(deepseek_v3_q4_tiny)
    for i, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        want = np.array(theirs(mx.array([prompt + out["token_ids"]]))[0])[len(prompt) - 1 : -1]
        np.testing.assert_allclose(np.stack(seen[i]), want, atol=ATOL, rtol=1e-4)
        assert out["token_ids"] == want.argmax(-1).tolist(), f"prompt {i}"


def test_the_real_shape_caches_71x_less_and_scales_as_transformers():
    """DeepSeek-V3's own config (built lazily: no weight is materialized): 576 cached
    numbers a token and layer, 70,272 bytes a token in bfloat16 against 4,997,120 for the
    expanded K (128 heads x 192) and V (128 x 128); the softmax scale with YaRN's
    mscale_all_dim as transformers computes it."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import yarn_apply_mscale

    rope = {
        "type": "yarn",
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    hf = DeepseekV3Config(rope_scaling=rope, max_position_embeddings=163840)
    config = {**hf.to_dict(), "rope_scaling": rope, "rope_theta": 10000.0}
    config.pop("rope_parameters")
    model = build_model(config)
    latent = memory.kv_bytes_per_block(model.spec, 16, (resolve("auto", mx.bfloat16),) * 2) // 16
    expanded = 61 * 128 * (192 + 128) * 2
    assert (latent, expanded) == (70_272, 4_997_120)
    assert round(expanded / latent, 1) == 71.1
    want = yarn_apply_mscale(hf.rope_parameters, 192**-0.5)
    assert model.layers[3].self_attn.scale == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(192**-0.5 * 1.3688879454113936**2)


def test_forked_choices_copy_their_latent_blocks_on_write(deepseek_v3_tiny: Path):
    """n=3 greedy choices share the prompt's blocks; the partial last one (45 = 2 x 16 + 13)
    is copied before a choice writes into it, latent pool and all."""
    llm = LLM(str(deepseek_v3_tiny), **SMALL)
    prompt = random_ids(45, seed=9)
    alone = llm.generate([prompt], GREEDY)[0]["token_ids"]
    three = SamplingParams(temperature=0.0, max_tokens=12, n=3, ignore_eos=True)
    out = llm.generate([prompt], three)[0]
    assert [choice["token_ids"] for choice in out["outputs"]] == [alone] * 3


def test_cuda_routes_latent_models_to_the_gather_path(monkeypatch: pytest.MonkeyPatch):
    """The CUDA decode kernel reads K and V pools of one width; a latent cache goes to the
    pure-MLX path there, everything else keeps the kernel."""
    from nanovllm_mlx.attention import cuda, select_backend
    from nanovllm_mlx.attention.gather import GatherAttention

    monkeypatch.setattr(cuda, "available", lambda: True)
    assert isinstance(select_backend(), cuda.CudaPagedAttention)
    # (Its SDPA follows the device: fused on a GPU, matmuls here.)
    assert type(select_backend(latent=True)) is GatherAttention


def test_quantize_at_load_computes_the_dequantized_weights(deepseek_v3_tiny: Path):
    """--quantize 4 (group 32) turns projections, stacked experts and unembed_out (32 wide;
    embed_q, 16 wide, stays float) into quantized layers, the routers stay float; the
    logits are those of the float model holding the dequantized weights."""
    import mlx.nn as nn
    from helpers import check_dequantized_twin

    from nanovllm_mlx.models.mla import QuantizedMultiLinear
    from nanovllm_mlx.models.switch import QuantizedSwitchLinear

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear, QuantizedMultiLinear)
    small = {**SMALL, "enable_prefix_caching": False}
    quantized = LLM(str(deepseek_v3_tiny), quantize=4, quantize_group_size=32, **small)
    model = quantized.engine.model_runner.model
    layers = {p: m for p, m in model.named_modules() if isinstance(m, kinds)}
    assert {type(m) for m in layers.values()} == {
        nn.QuantizedLinear,
        nn.QuantizedEmbedding,
        QuantizedSwitchLinear,
        QuantizedMultiLinear,
    }
    assert not any(".gate" in p and "proj" not in p for p in layers)  # routers
    check_dequantized_twin(quantized, deepseek_v3_tiny, layers, PROMPTS, **small)
