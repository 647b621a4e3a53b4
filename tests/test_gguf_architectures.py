"""GGUF files of the new architectures (Qwen3, Qwen3-MoE, Mixtral, Gemma 3, Phi-3), written
here from the random fixtures under llama.cpp's tensor names and metadata keys: the engine
reading them gives the logits of the safetensors checkpoint. Experts are stored as
llama.cpp stacks them (one [experts, out, in] tensor per projection), some in Q8_0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf_files import engine_logits, gguf_tensors, write_gguf
from helpers import random_ids


def _phi3_rope(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, int | float]:
    rope = config["rope_scaling"]
    tensors["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
    tensors["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return {
        "rope.dimension_count": int(head_dim * config["partial_rotary_factor"]),
        "rope.scaling.original_context_length": config["original_max_position_embeddings"],
        "attention.sliding_window": config["sliding_window"],
    }


def _extra(arch: str, config: dict, tensors: dict[str, np.ndarray]) -> dict[str, int | float]:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    extra: dict[str, int | float] = {"attention.key_length": head_dim}
    if "num_local_experts" in config:
        extra.update(expert_count=config["num_local_experts"])
        extra.update(expert_used_count=config["num_experts_per_tok"])
    if arch == "qwen3moe":
        extra.update(expert_count=config["num_experts"])
        extra.update(expert_used_count=config["num_experts_per_tok"])
        extra.update(expert_feed_forward_length=config["moe_intermediate_size"])
    if arch == "gemma3":
        extra["attention.sliding_window"] = config["sliding_window"]
        extra["attention.sliding_window_pattern"] = config["_sliding_window_pattern"]
    if arch == "phi3":
        extra.update(_phi3_rope(config, tensors))
    return extra


PROMPT = random_ids(60, seed=11)  # past Gemma's 32 and Phi-3's 48-token windows


@pytest.mark.parametrize(
    "fixture, arch",
    [
        ("qwen3_tiny", "qwen3"),
        ("qwen3_moe_tiny", "qwen3moe"),  # its dense layer has no router in the file
        ("mixtral_tiny", "llama"),  # llama.cpp writes Mixtral as llama with experts
        ("gemma3_tiny", "gemma3"),
        ("phi3_tiny", "phi3"),  # LongRoPE factors as tensors, fused qkv and gate/up
    ],
)
def test_gguf_equals_the_safetensors_checkpoint(
    fixture: str, arch: str, request: pytest.FixtureRequest, tmp_path: Path
):
    import gguf as gg

    model_dir = request.getfixturevalue(fixture)
    config = json.loads((model_dir / "config.json").read_text())
    tensors = gguf_tensors(model_dir, arch)
    extra = _extra(arch, config, tensors)
    # Experts in Q8_0 (kept quantized, 3-D triples through gather_qmm) against the same
    # values in float on the safetensors side would differ: float32 experts here, and the
    # Q8_0 path is checked below on its own.
    path = write_gguf(tmp_path / "m.gguf", model_dir, arch, tensors, extra=extra)
    np.testing.assert_allclose(
        engine_logits(path, PROMPT), engine_logits(model_dir, PROMPT), atol=1e-4
    )
    if any(name.endswith("_exps.weight") for name in tensors):
        quant = {n: gg.GGMLQuantizationType.Q8_0 for n in tensors if n.endswith("_exps.weight")}
        dequantized = {
            n: gg.quants.dequantize(gg.quants.quantize(v, quant[n]), quant[n]) if n in quant else v
            for n, v in tensors.items()
        }
        q8 = write_gguf(tmp_path / "q8.gguf", model_dir, arch, tensors, quant, extra)
        ref = write_gguf(tmp_path / "ref.gguf", model_dir, arch, dequantized, extra=extra)
        np.testing.assert_allclose(engine_logits(q8, PROMPT), engine_logits(ref, PROMPT), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_families_match_transformers(arch: str, gemma3_gguf: Path, tmp_path: Path):
    """The Llama-2 and Phi-3 SentencePiece pipelines (Metaspace vs a Prepend normalizer),
    on a tokenizer-only GGUF carrying this file's 262k vocabulary and scores under those
    architectures: no real Llama-2 or Phi-3 file is reachable from here."""
    import mmap

    import gguf as gg
    from gguf_files import CORPUS
    from transformers import AutoTokenizer

    from nanovllm_mlx.loading.gguf import reader
    from nanovllm_mlx.loading.gguf.tokenizer import tokenizer_from_metadata

    with open(gemma3_gguf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as b:
        meta = reader._Header(b).metadata
    path = tmp_path / f"{arch}.gguf"
    w = gg.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as b:
        ours = tokenizer_from_metadata(reader._Header(b).metadata, path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [*CORPUS, " leading", "  two leading"]:
        assert ours.encode(text) == hf(text).input_ids, text
