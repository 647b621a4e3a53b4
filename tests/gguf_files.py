"""GGUF files for the tests: the transformers-layout tensors of a checkpoint under
llama.cpp's names, a writer, the engine's logits of a GGUF, and a tokenizer corpus. Shared
by the GGUF test modules (no test module imports another)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import SMALL_KV, captured_logits

from nanovllm_mlx import LLM, SamplingParams

CORPUS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "  double  spaces   and\ttabs\t\t",
    "line1\nline2\n\n\nline3\r\nwindows",
    "Numbers: 0 7 42 1234567 3.14159 -12,345.67 2024-06-01 x=1_000_000 0x1F 1e-9",
    "Unicode: naïve café, straße, Ελληνικά, русский, 日本語の文章, 한국어, العربية",
    "emoji 🤖🎉 and a family 👩‍👩‍👧 and combining e\u0301",
    "def f(x):\n    return x ** 2  # comment\n\nclass A:\n\tpass\n",
    '{"json": [1, 2, {"k": null}], "s": "a\\"b"}',
    "I'm can't we've they'll she'd IT'S",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>x<file_sep>y<|im_start|><|im_end|>",
    "   ",
    "\n",
    "a" * 60,
]


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row permutation for q/k (rotary pairs interleaved)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused gate and up
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}
_GEMMA_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_EXPERTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up"}
_EXPERTS["down_proj"] = "down"


def gguf_tensors(model_dir: Path, arch: str) -> dict[str, np.ndarray]:
    """An HF checkpoint under llama.cpp's names: q/k permuted for llama, experts stacked,
    Gemma's norms stored as 1 + w."""
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    names = {**_NAMES, **_GEMMA_NAMES} if arch == "gemma3" else _NAMES
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    out = {}
    for key, value in load_file(str(model_dir / "model.safetensors")).items():
        value = value.astype(np.float32)
        stem, _, suffix = key.removeprefix("model.").rpartition(".")
        stem = stem.replace("block_sparse_moe", "mlp")
        if stem.startswith("layers."):
            _, n, rest = stem.split(".", 2)
            if ".experts." in rest:  # mlp.experts.E.w1 -> stacked ffn_gate_exps
                _, _, e, proj = rest.split(".")
                experts.setdefault((n, _EXPERTS[proj]), {})[int(e)] = value
                continue
            name = f"blk.{n}.{names[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj":
                value = _permute(value, config["num_attention_heads"])
            elif arch == "llama" and rest == "self_attn.k_proj":
                value = _permute(value, config["num_key_value_heads"])
        else:
            name = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}[stem]
        if arch == "gemma3" and name.endswith("norm"):
            value = value + 1.0  # llama.cpp stores Gemma's norms as 1 + w
        out[f"{name}.{suffix}"] = value
    for (n, proj), by_expert in experts.items():
        out[f"blk.{n}.ffn_{proj}_exps.weight"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def write_gguf(
    path: Path,
    model_dir: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    quant: dict[str, object] | None = None,
    extra: dict[str, int | float | str] | None = None,
) -> Path:
    """A GGUF with the fixture's config and GPT-2 tokenizer as metadata (plus `extra`
    {arch}.KEY entries: ints as uint32, floats as float32); tensors named in `quant` are
    stored in that GGMLQuantizationType."""
    import gguf as gg

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    added = {a["id"]: a["content"] for a in tok["added_tokens"]}
    tokens += [added[i] for i in range(len(tokens), len(tokens) + len(added)) if i in added]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    types = [3 if i in added else 1 for i in range(len(tokens))]

    w = gg.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
            continue
        add = w.add_float32 if isinstance(value, float) else w.add_uint32
        add(f"{arch}.{key}", value)
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    for name, value in tensors.items():
        qtype = (quant or {}).get(name)
        if qtype == "raw-mxfp4":  # already ggml MXFP4 blocks, as llama.cpp repacks them
            w.add_tensor(name, value, raw_dtype=gg.GGMLQuantizationType.MXFP4)
        elif qtype is None:
            w.add_tensor(name, value)
        else:
            w.add_tensor(name, gg.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def engine_logits(path: Path, prompt: list[int]) -> np.ndarray:
    # Quantized tensors stay quantized: MLX's quantized kernels are what is under test.
    llm = LLM(str(path), dtype="float32", keep_quantized=True, **SMALL_KV)
    with captured_logits() as seen:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    return np.concatenate(seen)
