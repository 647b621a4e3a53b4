"""GPT-2 builders: openai-community/gpt2's own file layout (single file, sharded, truncated,
missing) and whatever the installed transformers' save_pretrained writes (gpt2-tiny-hf5)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import scratch_owner, write_json
from .tokenizer import EOT_ID, TOKENIZER_FILES_BPE, TOKENIZER_FILES_JSON, write_gpt2_tokenizer
from .weights import (
    assert_loads_identically,
    check_greedy_robust,
    probe_ids,
    randomize_,
    save_safetensors,
    torch_rng_isolated,
)

if TYPE_CHECKING:
    import torch


def _gpt2_hf_config(p: dict[str, Any]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=p["n_embd"],
        n_layer=p["n_layer"],
        n_head=p["n_head"],
        n_positions=p["n_positions"],
        vocab_size=p["vocab_size"],
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
    )


@lru_cache(maxsize=2)
def _gpt2_model(frozen: tuple[tuple[str, Any], ...]) -> Any:
    from transformers import GPT2LMHeadModel

    p = dict(frozen)
    with torch_rng_isolated():
        model = GPT2LMHeadModel(_gpt2_hf_config(p))
    randomize_(model, p["seed"])
    return model.eval()


def gpt2_model(p: dict[str, Any]) -> Any:
    """The in-memory transformers GPT2LMHeadModel that the GPT-2 fixtures are saved from."""
    # Only the model-shaping parameters: the GPT-2 fixtures of one shape share one model.
    keys = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "seed")
    return _gpt2_model(tuple((k, p[k]) for k in keys))


def gpt2_hub_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Rename a transformers GPT-2 state dict to the openai-community/gpt2 file layout.

    The Hub file predates the ``transformer.`` prefix, keeps Conv1D weights as [in, out]
    (same as transformers' Conv1D, so no transpose), stores each block's causal-mask buffer
    ``h.N.attn.bias`` as float [1, 1, n_positions, n_positions], and has no lm_head.weight
    because it is tied to wte. It has no ``attn.masked_bias``: that buffer was added to the
    module after the checkpoint was converted (see transformers PR #24113's load warning,
    which lists only ``h.N.attn.bias`` as unused).
    """
    import torch

    cfg = model.config
    mask = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions, dtype=torch.float32))
    mask = mask.view(1, 1, cfg.n_positions, cfg.n_positions)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if not key.startswith("transformer."):
            raise AssertionError(f"unexpected GPT-2 key {key}")
        key = key.removeprefix("transformer.")
        # Keep the mask next to its block so size-based sharding splits blocks realistically.
        if key.endswith(".attn.c_attn.weight"):
            out[key.replace("c_attn.weight", "bias")] = mask.clone()
        out[key] = tensor.detach().clone().contiguous()
    if sum(k.endswith(".attn.bias") and ".c_" not in k for k in out) != cfg.n_layer:
        raise AssertionError("causal-mask buffers missing from GPT-2 hub state dict")
    return out


def _gpt2_hub_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of openai-community/gpt2's config.json, plus torch_dtype.
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": EOT_ID,
        "embd_pdrop": 0.1,
        "eos_token_id": EOT_ID,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": p["n_positions"],
        "n_embd": p["n_embd"],
        "n_head": p["n_head"],
        "n_layer": p["n_layer"],
        "n_positions": p["n_positions"],
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "torch_dtype": "float32",
        "vocab_size": p["vocab_size"],
    }


def _write_gpt2_meta(out: Path, p: dict[str, Any]) -> None:
    # Everything of the Hub layout but the weights.
    write_json(out / "config.json", _gpt2_hub_config(p))
    write_json(out / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    write_gpt2_tokenizer(out, p["n_positions"], files=TOKENIZER_FILES_BPE)


def _is_attn_mask_key(key: str) -> bool:
    return key.endswith("attn.bias") and not key.endswith("c_attn.bias")


def build_gpt2_hub(out: Path, p: dict[str, Any]) -> None:
    model = gpt2_model(p)
    save_safetensors(out / "model.safetensors", gpt2_hub_state_dict(model))
    _write_gpt2_meta(out, p)
    if p["verify"]:
        from transformers import GPT2LMHeadModel

        ids = probe_ids(p["vocab_size"])
        check_greedy_robust(scratch_owner(out.name), model, ids)
        assert_loads_identically(
            "gpt2 hub layout", GPT2LMHeadModel, out, model, ids, _is_attn_mask_key
        )


def build_gpt2_hf5(out: Path, p: dict[str, Any]) -> None:
    model = gpt2_model(p)
    # Whatever this transformers version writes: keys, config fields and generation_config.
    model.save_pretrained(out, safe_serialization=True)
    write_gpt2_tokenizer(out, p["n_positions"], files=TOKENIZER_FILES_JSON)


def shard_state_dict(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Greedy split in insertion order like transformers' sharding; an oversized tensor gets
    a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def build_gpt2_sharded(out: Path, p: dict[str, Any]) -> None:
    tensors = gpt2_hub_state_dict(gpt2_model(p))
    shards = shard_state_dict(tensors, p["max_shard_bytes"])
    if len(shards) < 2:
        raise AssertionError("sharded fixture ended up with a single shard")
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(out / fname, shard)
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    _write_gpt2_meta(out, p)


def build_gpt2_corrupt(out: Path, p: dict[str, Any]) -> None:
    from safetensors.torch import save

    blob = save(gpt2_hub_state_dict(gpt2_model(p)), metadata={"format": "pt"})
    # 1000 bytes ends inside the JSON header, so even the header cannot be parsed.
    (out / "model.safetensors").write_bytes(blob[: p["keep_bytes"]])
    _write_gpt2_meta(out, p)


def build_gpt2_no_weights(out: Path, p: dict[str, Any]) -> None:
    _write_gpt2_meta(out, p)
