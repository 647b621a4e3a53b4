"""The real Gemma 3 270M Q4_K_M GGUF (K-quants, Q5_0, Q8_0; sliding-window and global
layers; the 262k SentencePiece vocabulary) against transformers.

By default: the file loads with its quantized tensors kept quantized; logits match
transformers' Gemma3ForCausalLM holding the `gguf` package's dequantization of the same
file, past the 512-token window; the tokenizer gives the ids transformers' GGUF loader
gives (recorded); greedy completions name Paris. Marked slow: the same comparisons live
against transformers' own GGUF loader, which spends ~30 s building the tokenizer and ~70 s
the model.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import captured_logits_by_seq
from mlx.utils import tree_map_with_path

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.loading import gguf as gguf_loading
from nanovllm_mlx.loading.gguf import reader

# A prompt past the 512-token window, so the sliding layers must drop its start (624
# tokens, the first 112 out of the last one's window: as much a check as 927 tokens, which
# made the test 51 s against 32), and two short ones; prefill and 4 decode steps each, as
# one batch.
LONG = (
    "The history of Paris spans many centuries. "
    + " ".join(f"In year {1000 + 7 * i} the city grew by {i % 13} districts." for i in range(40))
    + " The capital city of France is"
)
SHORT = ["The capital city of France is", "def fibonacci(n):"]
# Measured (this file, CPU, float32): max |logit diff| 0.16 (with a 927-token LONG; 0.14
# with this one) over logits of magnitude up to ~30, all of it from re-quantizing the 9 Q6_K
# tensors to 8 bits: with those tensors given our re-quantized values on the transformers
# side too, the difference is 1.5e-4 (Q4_K, Q5_0 and Q8_0 map exactly). Top-1 agrees at
# every step.
LOGITS_ATOL = 0.3

# Ids from transformers' GGUF loader (AutoTokenizer.from_pretrained(gguf_file=...)).
GOLDEN_IDS = {
    "Hello world": [2, 9259, 1902],
    "  double  spaces   and\ttabs\t\t": [2, 138, 7902, 138, 35220, 139, 624, 255968, 39218, 255969],
    "Unicode: naïve café, 日本語の文章, emoji 🤖": [
        2, 123540, 236787, 120362, 33443, 236764, 33375, 238582, 236945, 30886, 236764,
        64334, 236743, 246143,
    ],
    "def f(x):\n    return x ** 2\n": [
        2, 2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 5213, 236743, 236778, 107,
    ],
    "<start_of_turn>user\nHi<end_of_turn>\n": [2, 105, 2364, 107, 10979, 106, 107],
}  # fmt: skip


@pytest.fixture(scope="module")
def gemma(gemma3_gguf: Path) -> LLM:
    return LLM(str(gemma3_gguf), dtype="float32", kv_cache_gb=0.1, max_model_len=2048)


def test_k_quants_stay_quantized(gemma3_gguf: Path):
    weights, config, _ = gguf_loading.read_model(gemma3_gguf)
    bits = {
        name: weights[f"layers.0.{name}.weight"].shape[-1] * 32 // in_dims
        for name, in_dims in [
            ("self_attn.o_proj", 1024),  # Q4_K: 4 bits, exact
            ("self_attn.q_proj", 640),  # Q5_0: 5 bits, exact
            ("self_attn.v_proj", 640),  # Q8_0
            ("mlp.down_proj", 2048),  # Q6_K: re-quantized to 8 bits
        ]
    }
    assert bits == {
        "self_attn.o_proj": 4,
        "self_attn.q_proj": 5,
        "self_attn.v_proj": 8,
        "mlp.down_proj": 8,
    }
    assert weights["embed_tokens.scales"].shape == (262144, 640 // 32)  # Q8_0 embedding
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 512


def test_tokenizer_gives_transformers_ids(gemma: LLM):
    tok = gemma.tokenizer
    for text, ids in GOLDEN_IDS.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert tok.bos_token_id == 2 and tok.add_bos and {1, 106} <= tok.eos_token_ids
    assert tok.encode("<bos>hi").count(2) == 1  # no second BOS (transformers adds one)


def test_chat_template(gemma: LLM):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert gemma.tokenizer.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_greedy_completions_name_paris(gemma: LLM):
    """The base 270M model continues the bare "The capital city of France is" with " the
    capital of the country of France." (so does transformers' greedy decode of this file);
    a one-shot prefix or a question gets Paris."""
    prompts = [
        "The capital city of Germany is Berlin. The capital city of France is",
        "Q: What is the capital city of France?\nA:",
        "The capital city of France is",
    ]
    outs = gemma.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert outs[0]["text"].split()[0].strip(".,") == "Paris", outs[0]
    assert outs[1]["text"].split()[0].strip(".,") == "Paris", outs[1]
    assert outs[2]["text"].startswith(" the capital of the country of France."), outs[2]


def _dequantized_reference(path: Path):
    """transformers' Gemma3ForCausalLM holding the `gguf` package's dequantization of every
    tensor of the file (its blocks read through our header offsets: gguf's own reader
    spends ~30 s on the 262k-token vocabulary)."""
    import gguf
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.initialization import no_init_weights

    names = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = reader._Header(buf)
        data = np.frombuffer(buf, dtype=np.uint8)
        state = {}
        for name, (kind, dims, offset) in header.tensors.items():
            qtype = gguf.GGMLQuantizationType(kind)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            count = int(np.prod(dims))
            start = header.data_start + offset
            raw = data[start : start + count // block * size].copy()
            if qtype in (gguf.GGMLQuantizationType.F32,):
                w = raw.view(np.float32)
            else:
                # A tensor row a row (dims[0] values): gguf dequantizes 16 rows a call, so
                # rows of one block each cost 27 s of Python calls here, these 3.6 s (the
                # same values: each block is dequantized on its own either way).
                rows = raw.reshape(-1, dims[0] // block * size)
                w = gguf.quants.dequantize(rows, qtype).astype(np.float32)
            stem = name.removesuffix(".weight")
            parts = stem.split(".")
            if parts[0] == "blk":
                key = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            else:
                key = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}[stem]
                key += ".weight"
            w = w.reshape(tuple(reversed(dims)))
            if key.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma's norm weights as 1 + w
            state[key] = torch.from_numpy(np.ascontiguousarray(w))
        del data
    meta = header.metadata
    config = Gemma3TextConfig(
        hidden_size=meta["gemma3.embedding_length"],
        num_hidden_layers=meta["gemma3.block_count"],
        intermediate_size=meta["gemma3.feed_forward_length"],
        num_attention_heads=meta["gemma3.attention.head_count"],
        num_key_value_heads=meta["gemma3.attention.head_count_kv"],
        head_dim=meta["gemma3.attention.key_length"],
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        max_position_embeddings=meta["gemma3.context_length"],
        sliding_window=meta["gemma3.attention.sliding_window"],
        rms_norm_eps=meta["gemma3.attention.layer_norm_rms_epsilon"],
        query_pre_attn_scalar=meta["gemma3.attention.key_length"],
        rope_theta=meta["gemma3.rope.freq_base"],
    )
    with no_init_weights():
        model = Gemma3ForCausalLM(config)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_logits(gemma: LLM, model, texts: list[str], steps: int = 4) -> float:
    """The engine's prefill and decode logits of texts (one batch) against model's."""
    import torch

    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    prompts = [gemma.tokenizer.encode(p) for p in texts]
    with captured_logits_by_seq() as seen:
        outs = gemma.generate(prompts, params)
    seq_ids = sorted(seen)  # this call's sequences, in prompt order
    worst = 0.0
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        with torch.no_grad():
            # The head on the positions compared only: 262k logits for all 700 positions
            # of the long prompt took most of the reference's time.
            hidden = model.model(torch.tensor([prompt + out["token_ids"]])).last_hidden_state
            ref = np.zeros((len(prompt) + steps, model.config.vocab_size), np.float32)
            ref[len(prompt) - 1 :] = model.lm_head(hidden[0, len(prompt) - 1 :]).numpy()
        rows = seen[seq_ids[i]]
        assert len(rows) == steps
        for step, logits in enumerate(rows):
            expected = ref[len(prompt) - 1 + step]
            worst = max(worst, float(np.abs(logits - expected).max()))
            np.testing.assert_allclose(
                logits, expected, atol=LOGITS_ATOL, err_msg=f"prompt {i} step {step}"
            )
            assert logits.argmax() == expected.argmax(), f"prompt {i} step {step}"
        assert out["token_ids"] == ref[len(prompt) - 1 : -1].argmax(-1).tolist()
    return worst


def _dequantize_linears(llm: LLM) -> None:
    """Replace the quantized linear layers by float ones holding their exact values: MLX's
    quantized matmul on CPU prefilled this model at 8 tok/s against 110 for float32."""
    model = llm.engine.model_runner.model

    def dense(_: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.QuantizedLinear):
            return module
        weight = mx.dequantize(
            module.weight, module.scales, module.biases, module.group_size, module.bits
        )
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight = weight
        return layer

    leaves = tree_map_with_path(dense, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    mx.eval(model.parameters())


def test_logits_match_transformers_on_the_dequantized_weights(gemma3_gguf: Path):
    """Short prompts through the quantized layers; then, the same weights as float32, a
    prompt past the 512-token sliding window (too slow through CPU quantized kernels)."""
    reference = _dequantized_reference(gemma3_gguf)
    llm = LLM(
        str(gemma3_gguf),
        dtype="float32",
        kv_cache_gb=0.1,
        max_model_len=2048,
        max_num_batched_tokens=1024,  # the budget measured on quantized layers is 64
    )
    worst = _check_logits(llm, reference, SHORT)
    _dequantize_linears(llm)
    assert len(llm.tokenizer.encode(LONG)) > 600
    worst = max(worst, _check_logits(llm, reference, [LONG, *SHORT]))
    print(f"max |logit diff| {worst:.3g}")


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_loader(gemma: LLM, gemma3_gguf: Path):
    from gguf_files import CORPUS
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name)
    extra = [
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n",
        "x<bos><eos><pad><unk><mask>[multimodal]<unused0>",
        "a  b   c    d\t\ttabs\n\n\n",
        "<0x41> ▁ literal",
    ]
    for text in CORPUS + extra:
        ids = gemma.tokenizer.encode(text)
        assert ids == hf(text).input_ids, text
        assert gemma.tokenizer.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(gemma: LLM, gemma3_gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name, dtype=torch.float32
    ).eval()
    _check_logits(gemma, model, SHORT)
