"""GGUF files (llama.cpp's format): weights, an HF-style config and the tokenizer.

`mx.load` reads GGUF natively and keeps Q4_0, Q4_1 and Q8_0 tensors quantized, as MLX
affine triples (weight uint32, scales, biases) with group size 32. Other quantization types
it either dequantizes to float16 or cannot read, so this module checks each tensor's type in
the file header first and refuses those with a clear message.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanovllm_mlx.loading.tokenizer import Tokenizer

GROUP_SIZE = 32  # every GGUF block type MLX keeps quantized has 32-weight blocks
ARCHITECTURES = ("llama", "qwen2")

# ggml_type id -> (name, weights per block, bytes per block) for the types we accept.
SUPPORTED_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),  # mx.load widens it to float16
}
# Names only, for error messages.
OTHER_TYPES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
    14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# GGUF metadata value types: struct format of the fixed-size ones; 8 is string, 9 array.
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip


class _Header:
    """The parts of a GGUF header that mx.load does not report: tensor types and extents."""

    def __init__(self, buf: bytes | mmap.mmap):
        self._buf = buf
        self._pos = 0
        self._parse()

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self._pos + size > len(self._buf):
            raise EOFError
        values = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += size
        return values

    def _skip(self, n: int) -> None:
        if self._pos + n > len(self._buf):
            raise EOFError
        self._pos += n

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        start = self._pos
        self._skip(n)
        return bytes(self._buf[start : self._pos]).decode("utf-8", errors="replace")

    def _value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == 8:
            return self._string()
        if kind == 9:
            item, count = self._unpack("IQ")
            if item in _SCALARS:
                self._skip(struct.calcsize("<" + _SCALARS[item]) * count)
            else:
                for _ in range(count):
                    self._value(item)
            return None
        raise ValueError(f"unknown metadata value type {kind}")

    def _parse(self) -> None:
        (magic,) = self._unpack("4s")
        if magic != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        (version,) = self._unpack("I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = self._unpack("QQ")
        alignment = 32
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("I")
            value = self._value(kind)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        self.tensors: dict[str, tuple[int, tuple[int, ...], int]] = {}
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("I")
            dims = self._unpack("Q" * n_dims)
            kind, offset = self._unpack("IQ")
            self.tensors[name] = (kind, dims, offset)
        self.data_start = -(-self._pos // alignment) * alignment


def _check_file(path: Path) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """Tensor types and sizes from the header; ValueError naming the file on any problem."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _Header(buf)
    except EOFError:
        raise ValueError(f"{path}: truncated GGUF file (the header ends early)") from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt GGUF file: {e}") from None
    unsupported = {
        name: OTHER_TYPES.get(kind, f"type {kind}")
        for name, (kind, _, _) in header.tensors.items()
        if kind not in SUPPORTED_TYPES
    }
    if unsupported:
        kinds = sorted(set(unsupported.values()))
        example = next(iter(unsupported))
        raise ValueError(
            f"{path}: unsupported GGUF quantization type(s) {', '.join(kinds)} "
            f"(e.g. tensor {example}); MLX keeps only Q4_0, Q4_1 and Q8_0 quantized "
            "(and reads F32/F16/BF16): use a Q4_0/Q4_1/Q8_0 file, or the safetensors "
            "checkpoint with --quantize 4|8"
        )
    size = path.stat().st_size
    for name, (kind, dims, offset) in header.tensors.items():
        _, block, block_bytes = SUPPORTED_TYPES[kind]
        count = 1
        for d in dims:
            count *= d
        end = header.data_start + offset + count // block * block_bytes
        if end > size:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, "
                f"the file has {size} (incomplete download?)"
            )
    return header.tensors


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """All tensors (quantized ones as weight/scales/biases) and the metadata of a GGUF."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    _check_file(path)
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError with a C++ message
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from None
    return weights, metadata


def _value(v: object) -> object:
    """Metadata scalars come back from mx.load as 0-d arrays."""
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def config_from_metadata(metadata: dict, tensor_names: set[str], path: Path) -> dict:
    """An HF config.json equivalent for the llama and qwen2 architectures."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )

    def key(name: str, default: object = None) -> object:
        return _value(metadata.get(f"{arch}.{name}", default))

    missing = [
        f"{arch}.{k}"
        for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
        if f"{arch}.{k}" not in metadata
    ]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    vocab = key("vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else None
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata gives no vocabulary size")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "intermediate_size": key("feed_forward_length"),
        "vocab_size": vocab,
        "max_position_embeddings": key("context_length", 2048),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        # llama.cpp's converter writes output.weight only when the head is not tied.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": arch == "llama" and "blk.0.attn_output.bias" in tensor_names,
        "bos_token_id": _value(metadata.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _value(metadata.get("tokenizer.ggml.eos_token_id")),
    }
    scaling = key("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": key("rope.scaling.factor"),
            "original_max_position_embeddings": key(
                "rope.scaling.original_context_length", config["max_position_embeddings"]
            ),
        }
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: unsupported GGUF rope scaling type {scaling!r}")
    return config


_GGUF_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (its rotary pairs are interleaved, HF's halves).

    Rows are output features for the weight, its scales and biases alike, so the same row
    shuffle applies to quantized triples without dequantizing."""
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def map_weights(weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """GGUF tensor names onto models/llama.py's; HF row order for llama's q and k."""
    out: dict[str, mx.array] = {}
    permuted = config["model_type"] == "llama"
    for name, value in weights.items():
        if name == "rope_freqs.weight":
            config["rope_freq_factors"] = value.astype(mx.float32).tolist()
            continue
        stem, _, suffix = name.rpartition(".")  # suffix: weight, bias, scales or biases
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
            target = f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
            if permuted and parts[2] == "attn_q":
                value = _unpermute(value, config["num_attention_heads"])
            elif permuted and parts[2] == "attn_k":
                value = _unpermute(value, config["num_key_value_heads"])
        elif stem in _GGUF_NAMES:
            target = _GGUF_NAMES[stem]
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r} for a {config['model_type']} model")
        out[f"{target}.{suffix}"] = value
    return out


# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp applies
# them (one after the other, each splitting the pieces of the previous one). These are the
# tokenizer.json regexes of the original models.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "gpt2": [_GPT2_SPLIT],
    "gpt-2": [_GPT2_SPLIT],
    "mpt": [_GPT2_SPLIT],
    "olmo": [_GPT2_SPLIT],
    "jais": [_GPT2_SPLIT],
    "phi-2": [_GPT2_SPLIT],
    # StarCoder's family: every digit alone, then GPT-2's split.
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "refact": [r"\p{N}", _GPT2_SPLIT],
    "command-r": [r"\p{N}", _GPT2_SPLIT],
    "codeshell": [r"\p{N}", _GPT2_SPLIT],
    "exaone": [r"\p{N}", _GPT2_SPLIT],
    "minerva-7b": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-v3": [_LLAMA3_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "falcon3": [_LLAMA3_SPLIT],
    "dbrx": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "pixtral": [_LLAMA3_SPLIT],
    "chatglm-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
    "stablelm2": [_QWEN2_SPLIT],
    "megrez": [_QWEN2_SPLIT],
}
# Qwen2's tokenizer.json NFC-normalizes first (llama.cpp does not; the original does).
_NFC = {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"}
# Llama 3's tokenizer.json sets ignore_merges: a word already in the vocabulary is one token.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"}
# Token texts llama.cpp treats as end of generation besides the EOS id.
_END_OF_GENERATION = {
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>",
}  # fmt: skip
CONTROL, USER_DEFINED, BYTE = 3, 4, 6


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few converted vocabularies spell tokens in plain UTF-8: respell them byte-level.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES, fuse_unk=False))
    if pre in _NFC:
        tok.normalizer = normalizers.NFC()
    splits = PRE_TOKENIZER_SPLITS.get(pre, [_GPT2_SPLIT])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], scores: list[float], add_prefix_space: bool) -> HFTokenizer:
    """Llama/Mistral's SentencePiece BPE with byte fallback, built as transformers'
    LlamaTokenizer builds it; a GGUF has no merges for it, so they are rebuilt from the
    scores (a higher-scored piece merges first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(left, right, score) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tok = HFTokenizer(
        models.BPE(vocab, [(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def tokenizer_from_metadata(metadata: dict, path: Path) -> Tokenizer:
    """The tokenizer a GGUF describes: vocabulary, merges, special tokens, chat template."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF metadata holds no tokenizer (tokenizer.ggml.tokens)")
    types = _value(metadata.get("tokenizer.ggml.token_type")) or [1] * len(tokens)
    if kind == "gpt2":
        merges = metadata.get("tokenizer.ggml.merges") or []
        tok = _byte_level(tokens, merges, metadata.get("tokenizer.ggml.pre", "default"))
        default_add_bos = False
        spelled = set(_bytes_to_unicode().values())
    elif kind == "llama":
        scores = _value(metadata.get("tokenizer.ggml.scores")) or [0.0] * len(tokens)
        prefix = metadata.get("tokenizer.ggml.add_space_prefix")
        tok = _sentencepiece(tokens, scores, True if prefix is None else bool(_value(prefix)))
        default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        spelled = None
    else:
        raise ValueError(
            f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)"
        )
    # Control tokens (<|im_start|>...) match whole and are special; user-defined ones match
    # whole but are ordinary text. A control token outside the byte alphabet is a llama.cpp
    # mislabel that no text can produce; transformers skips those too.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == CONTROL and (spelled is None or set(t) <= spelled)
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types)
            if k == USER_DEFINED
        ]
    )

    def token_id(name: str) -> int | None:
        value = _value(metadata.get(f"tokenizer.ggml.{name}"))
        return value if isinstance(value, int) and 0 <= value < len(tokens) else None

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    eos_ids = {eos, token_id("eot_token_id"), token_id("eom_token_id")} - {None}
    eos_ids |= {i for i, t in enumerate(tokens) if types[i] == CONTROL and t in _END_OF_GENERATION}
    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    add_bos = default_add_bos if add_bos is None else bool(_value(add_bos))
    special = {
        name: tokens[i]
        for name, i in (
            ("bos_token", bos),
            ("eos_token", eos),
            ("unk_token", token_id("unknown_token_id")),
            ("pad_token", token_id("padding_token_id")),
        )
        if i is not None
    }
    template = metadata.get("tokenizer.chat_template")
    return Tokenizer(tok, eos_ids, bos, add_bos, template, special)
