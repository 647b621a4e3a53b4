"""The constrained-decoding libraries we compared, on the engine's own tokenizer: setup
(tokenizer or vocabulary), grammar compile time, and the per-step mask time along a valid
JSON document, which each must accept token by token.

    python benchmarks/grammar_libraries.py tests/.fixtures/gpt2-tiny [more models]

llguidance is the engine's dependency; outlines_core and xgrammar are measured when
installed (xgrammar needs torch, transformers and triton; outlines_core reads a
vocabulary of raw token bytes, built here from the tokenizer).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import numpy as np

import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
from nanovllm_mlx.loading import loader
from nanovllm_mlx.loading.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace the first programmer",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["a", "ccc", "bb", "a"],
    "address": {"city": "London", "zip": "12345"},
    "score": 99.5,
    "active": True,
}
# Compact JSON, which every library is told to expect (no free whitespace).
TEXT = json.dumps(DOC, separators=(",", ":"))

# (setup, compile) -> (fill the mask of the next token into a numpy int32 array, consume)
Bench = Callable[[Tokenizer, int, int], tuple[float, float, Callable, Callable]]


def llguidance_bench(
    tok: Tokenizer, vocab: int, eos: int
) -> tuple[float, float, Callable, Callable]:
    import llguidance
    from llguidance.numpy import fill_next_token_bitmask

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}
    )
    matcher = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    return (
        t1 - t0,
        t2 - t1,
        lambda m: fill_next_token_bitmask(matcher, m[None]),
        matcher.consume_token,
    )


def outlines_bench(tok: Tokenizer, vocab: int, eos: int) -> tuple[float, float, Callable, Callable]:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    from nanovllm_mlx.loading.gguf.tokenizer import _bytes_to_unicode

    t0 = time.perf_counter()
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    pieces: dict[bytes, list[int]] = {}
    for piece, i in tok.tokenizer.get_vocab().items():
        if i == eos or i >= vocab:
            continue
        if all(c in byte_of for c in piece):  # byte-level BPE
            raw = bytes(byte_of[c] for c in piece)
        elif piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            raw = bytes([int(piece[3:-1], 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()
        pieces.setdefault(raw, []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, pieces)
    t1 = time.perf_counter()
    guide = outlines_core.Guide(
        outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA), None), vocabulary)
    )
    t2 = time.perf_counter()

    def fill(mask: np.ndarray) -> None:
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)

    return t1 - t0, t2 - t1, fill, lambda t: guide.advance(t, return_tokens=False)


def xgrammar_bench(tok: Tokenizer, vocab: int, eos: int) -> tuple[float, float, Callable, Callable]:
    import torch
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    matcher = xgrammar.GrammarMatcher(compiled)
    t2 = time.perf_counter()
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def fill(mask: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(bitmask)
        mask[:] = bitmask[0].numpy()

    del torch
    return t1 - t0, t2 - t1, fill, matcher.accept_token


BENCHES: dict[str, Bench] = {
    "llguidance": llguidance_bench,
    "outlines_core": outlines_bench,
    "xgrammar": xgrammar_bench,
}


def main(model: str) -> None:
    loaded = loader.load(model)
    tok, vocab = loaded.tokenizer, loaded.model.spec.vocab_size
    ids = tok.encode(TEXT, add_special_tokens=False)
    eos = min(tok.eos_token_ids)
    print(f"{loaded.name}: vocabulary {vocab}, the document is {len(ids)} tokens")
    for name, bench in BENCHES.items():
        try:
            setup, compile_s, fill, consume = bench(tok, vocab, eos)
        except ImportError as e:
            print(f"  {name:14s} not installed ({e})")
            continue
        mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
        times = []
        for t in ids:
            start = time.perf_counter()
            fill(mask)
            times.append(time.perf_counter() - start)
            assert (int(mask[t // 32]) >> (t % 32)) & 1, f"{name} refuses token {t}"
            consume(t)
        ms = np.array(times) * 1e3
        print(
            f"  {name:14s} setup {setup * 1e3:7.1f} ms  compile {compile_s * 1e3:7.1f} ms  "
            f"mask mean {ms.mean():.3f} ms  p50 {np.median(ms):.3f}  "
            f"p99 {np.percentile(ms, 99):.3f}"
        )


if __name__ == "__main__":
    for path in sys.argv[1:]:
        main(path)
