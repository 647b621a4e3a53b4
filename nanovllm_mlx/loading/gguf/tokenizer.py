"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers` Tokenizer.

A GGUF carries the vocabulary (and merges for byte-level BPE, scores for SentencePiece),
token types and the name of the pre-tokenizer; the regexes and normalizers that name
stands for live in llama.cpp's source, so they are spelled out here.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanovllm_mlx.loading.gguf.reader import metadata_value as _value
from nanovllm_mlx.loading.tokenizer import Tokenizer

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
# o200k's split (GPT-4o; Phi-4-mini's vocabulary): case runs, contractions attached.
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
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
    "gpt-4o": [_GPT4O_SPLIT],
    "llama4": [_GPT4O_SPLIT],
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
GEMMA = ("gemma", "gemma2", "gemma3")
# Gemma's turn format: "model" for the assistant, a system prompt folded into the first
# user turn (Gemma has no system role).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + ns.system + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


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


def _bpe_from_scores(tokens: list[str], scores: list[float]) -> models.BPE:
    """SentencePiece BPE with byte fallback; a GGUF has no merges for it, so they are
    rebuilt from the vocabulary: every split of a piece into two pieces, the pieces with
    higher scores merging first (ties: longer left part, then longer right part)."""
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
    return models.BPE(vocab, [(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True)


def _sentencepiece(
    tokens: list[str], scores: list[float], add_prefix_space: bool, family: str
) -> HFTokenizer:
    """SentencePiece vocabularies as transformers builds them from a GGUF, by family:

    - llama (Llama 2, Mistral): spaces -> "▁" by a Metaspace pre-tokenizer, with a prefix
      space unless add_space_prefix is false;
    - phi3: the same through a normalizer (Prepend + Replace), which differs only on text
      that starts with a space;
    - gemma: no prefix space, and merges ordered by the vocabulary's order, not its scores
      (Gemma's scores do not follow its merge order)."""
    prefix = add_prefix_space and family != "gemma"
    if family == "gemma":
        scores = [-float(i) for i in range(len(tokens))]
    tok = HFTokenizer(_bpe_from_scores(tokens, scores))
    if family == "llama":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False
        )
    else:
        steps = [normalizers.Prepend("▁")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _respell_spaces(tokens: list[str]) -> list[str]:
    """Gemma files store the tokens of two or more spaces as spaces, where its vocabulary
    spells them with "▁"."""
    return ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]


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
        arch = metadata.get("general.architecture", "llama")
        family = "gemma" if arch in GEMMA else "phi3" if arch == "phi3" else "llama"
        if family == "gemma":
            tokens = _respell_spaces(tokens)
        scores = _value(metadata.get("tokenizer.ggml.scores")) or [0.0] * len(tokens)
        prefix = metadata.get("tokenizer.ggml.add_space_prefix")
        prefix = True if prefix is None else bool(_value(prefix))
        tok = _sentencepiece(tokens, scores, prefix, family)
        default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        spelled = None
    else:
        raise ValueError(
            f"{path}: unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)"
        )
    vocab = set(tokens)
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
    # Respelled vocabularies (Gemma's) no longer hold some of the file's spellings.
    original = metadata.get("tokenizer.ggml.tokens")
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(original, types)
            if k == USER_DEFINED and t in vocab
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
    if template is None and metadata.get("general.architecture") in GEMMA:
        template = GEMMA_CHAT_TEMPLATE  # base-model files carry none; llama.cpp's default too
    return Tokenizer(tok, eos_ids, bos, add_bos, template, special)
