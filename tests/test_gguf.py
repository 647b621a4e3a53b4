"""GGUF: the real default model (SmolLM2-135M-Instruct Q4_1) against transformers, GGUFs
written here from the random Llama/Qwen2 fixtures, and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf_files import CORPUS, engine_logits, gguf_tensors, write_gguf
from helpers import captured_logits, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.loading import loader
from nanovllm_mlx.loading.gguf import reader as gguf_reader
from nanovllm_mlx.loading.gguf import tokenizer as gguf_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> LLM:
    # Kept quantized: these tests check MLX's quantized kernels on the real file (what Metal
    # and CUDA run); the CPU's default dequantization is checked in test_first_run.py.
    return LLM(str(smollm2_gguf), max_model_len=1024, kv_cache_gb=0.1, keep_quantized=True)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


# ------------------------------------------------------------------ the real model


def test_tokenizer_matches_transformers(smol: LLM, hf_tokenizer):
    hf = hf_tokenizer
    tok = smol.tokenizer
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|><|im_end|>") == [1, 2]  # control tokens stay whole
    assert tok.decode([1, 504, 2]) == "The"  # and are skipped when decoding text
    assert tok.bos_token_id == hf.bos_token_id and 2 in tok.eos_token_ids
    assert not tok.add_bos
    # SmolLM2 was trained with every digit a token of its own (llama.cpp's "smollm" split).
    assert tok.decode([tok.encode("1234")[i] for i in range(4)]) == "1234"
    assert len(tok.encode("1234")) == 4


def test_chat_template_renders_and_matches_transformers(smol: LLM, hf_tokenizer):
    hf = hf_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = smol.tokenizer.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                         "<|im_start|>assistant\n")  # fmt: skip
    ids = smol.tokenizer.encode_chat(messages)
    assert ids == hf(text, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids[1] != 1  # the template's own <|im_start|>, no extra BOS


def test_logits_match_transformers_dequantized(smol: LLM, smollm2_gguf: Path):
    """Our Q4_1/Q8_0 quantized matmuls vs transformers' float32 model dequantized from the
    same file: the same weights, so only float32 rounding differs. Measured: max abs diff
    7e-5 on logits up to ~28 in magnitude, top-1 equal at every step. Also proves the q/k
    row un-permutation (a wrong one changes logits by whole units)."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = smol.tokenizer.encode(
        "The capital city of France is Paris. The capital city of Italy is Rome. "
        "The capital of Japan is"
    )
    with captured_logits() as seen:
        out = smol.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = out[0]["token_ids"]
    assert len(seen) == 6  # the prefill and each decode, or the loop below checks nothing
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0].numpy()
    for step, logits in enumerate(seen):
        expected = ref[len(prompt) - 1 + step]
        np.testing.assert_allclose(logits[0], expected, atol=5e-4, err_msg=f"step {step}")
        assert logits[0].argmax() == expected.argmax()
    assert tokens == ref[len(prompt) - 1 : -1].argmax(-1).tolist()


@pytest.mark.parametrize(
    "country, capital", [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo")]
)
def test_greedy_capitals(smol: LLM, country: str, capital: str):
    out = smol.generate([f"The capital city of {country} is"], GREEDY)[0]
    assert out["text"].split()[0].strip(".,") == capital, out["text"]


def test_chat_answers_with_a_sentence_naming_paris(smol: LLM):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = smol.chat(messages, SamplingParams(temperature=0.0, max_tokens=30))
    assert "Paris" in out["text"] and out["finish_reason"] == "stop", out
    assert out["text"].rstrip().endswith(".") and len(out["text"].split()) >= 3


# ------------------------------------------------------------------ GGUFs written here


PROMPT = random_ids(29, seed=7)


@pytest.mark.parametrize("fixture, arch", [("llama_tiny", "llama"), ("qwen2_tiny", "qwen2")])
def test_f32_gguf_equals_the_safetensors_checkpoint(
    fixture: str,
    arch: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
):
    """Names, config from metadata, q/k un-permutation (llama), biases (qwen2), tied or
    untied head and the GPT-2 tokenizer, all from the file alone."""
    model_dir = request.getfixturevalue(fixture)
    path = write_gguf(tmp_path / "m.gguf", model_dir, arch, gguf_tensors(model_dir, arch))
    expected = engine_logits(model_dir, PROMPT)
    np.testing.assert_allclose(engine_logits(path, PROMPT), expected, atol=1e-4)

    from tokenizers import Tokenizer as HFTokenizer

    weights, metadata = gguf_reader.read_gguf(path)
    ours = gguf_tokenizer.tokenizer_from_metadata(metadata, path)
    reference = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text).ids, text


def test_quantized_types_match_their_dequantized_values(llama_tiny: Path, tmp_path: Path):
    """Q4_0, Q4_1 and Q8_0 tensors run through MLX's quantized matmul / embedding and give
    the logits of gguf-py's reference dequantization of the same blocks."""
    import gguf as gg

    T = gg.GGMLQuantizationType
    tensors = gguf_tensors(llama_tiny, "llama")
    quant = {"token_embd.weight": T.Q8_0, "output.weight": T.Q4_0}
    for name in tensors:
        if name.startswith("blk.") and name.endswith(".weight") and "norm" not in name:
            quant[name] = T.Q4_1 if "attn" in name else T.Q4_0
    quantized = write_gguf(tmp_path / "q.gguf", llama_tiny, "llama", tensors, quant)
    dequantized = {
        name: gg.quants.dequantize(gg.quants.quantize(v, quant[name]), quant[name])
        if name in quant
        else v
        for name, v in tensors.items()
    }
    reference = write_gguf(tmp_path / "ref.gguf", llama_tiny, "llama", dequantized)

    loaded = loader.load(str(quantized), loader.LoadOptions(dtype="float32", keep_quantized=True))
    assert type(loaded.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert loaded.model.embed_tokens.bits == 8 and loaded.model.lm_head.bits == 4
    assert loaded.model.layers[0].self_attn.q_proj.group_size == 32
    np.testing.assert_allclose(
        engine_logits(quantized, PROMPT),
        engine_logits(reference, PROMPT),
        atol=1e-4,
    )


# ------------------------------------------------------------------ bad input


def _tiny_gguf(path: Path, arch: str = "llama", raw_type: object = None) -> Path:
    import gguf as gg

    w = gg.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if raw_type is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    else:
        block, size = gg.GGML_QUANT_SIZES[raw_type]
        w.add_tensor(
            "token_embd.weight", np.zeros((8, 256 // block * size), np.uint8), raw_dtype=raw_type
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path: Path):
    path = _tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(ValueError, match=r"mamba\.gguf: unsupported GGUF architecture 'mamba'"):
        loader.load(str(path))


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ2_XS", "TQ1_0", "Q8_1"])
def test_unsupported_quantization_type(name: str, tmp_path: Path):
    import gguf as gg

    path = _tiny_gguf(tmp_path / "k.gguf", raw_type=gg.GGMLQuantizationType[name])
    with pytest.raises(
        ValueError,
        match=rf"k\.gguf: unsupported GGUF quantization type\(s\) {name} \(e\.g\. tensor "
        rf"token_embd\.weight is {name}\)",
    ):
        loader.load(str(path))


def test_truncated_and_corrupt_files(llama_tiny: Path, tmp_path: Path):
    good = write_gguf(
        tmp_path / "good.gguf", llama_tiny, "llama", gguf_tensors(llama_tiny, "llama")
    )
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(
        ValueError, match=r"cut\.gguf: truncated GGUF file: tensor .* \(incomplete download"
    ):
        loader.load(str(cut))
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:5000])
    with pytest.raises(
        ValueError, match=r"header\.gguf: truncated GGUF file \(the header ends early\)"
    ):
        loader.load(str(header))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match=r"junk\.gguf: corrupt GGUF file: not a GGUF file"):
        loader.load(str(junk))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        loader.load(str(tmp_path / "missing.gguf"))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf files"):
        loader.load(str(two))
