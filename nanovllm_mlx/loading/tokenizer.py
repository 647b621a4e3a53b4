"""Tokenizer, chat template and streaming detokenizer, on `tokenizers` and `jinja2`."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.decoders import DecodeStream

# For models that ship no template (GPT-2): plain "role: content" turns.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _token_content(token: object) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


class Detokenizer:
    """Text of one request's output, a token at a time, never splitting a character.

    A few prompt tokens give the stream the context that decoders such as SentencePiece's
    need for the first word's leading space.
    """

    def __init__(self, tokenizer: HFTokenizer, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=prompt_ids[-4:], skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """The text this token completes ("" while it holds part of a character)."""
        return self._stream.step(self._tokenizer, token_id) or ""


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        eos_token_ids: set[int],
        bos_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        self._template: jinja2.Template | None = None

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The tokenizer's own post-processor adds BOS for some models (Llama 3); the
        # add_bos_token flag of tokenizer_config.json or GGUF covers the others.
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (those the detokenizer drops), EOS included."""
        added = self.tokenizer.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        return frozenset(special | set(self.eos_token_ids))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The template's text for messages; template_kwargs (tools, enable_thinking, ...)
        are the template's variables, as transformers passes them."""
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise ValueError(f"chat template: {message}")

            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None: json.dumps(
                x, ensure_ascii=False, indent=indent
            )
            self._template = env.from_string(self.chat_template or FALLBACK_CHAT_TEMPLATE)
        variables = {**self.special_tokens, **template_kwargs}
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def encode_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        return self.encode_text(self.apply_chat_template(messages, **template_kwargs))

    def encode_text(self, chat_text: str) -> list[int]:
        """Token ids of a rendered chat: the template writes BOS itself where the model
        wants one."""
        return self.encode(chat_text, add_special_tokens=self.chat_template is None)

    def detokenizer(self, prompt_ids: list[int]) -> Detokenizer:
        """A streaming decoder for one request's output."""
        return Detokenizer(self.tokenizer, prompt_ids)

    @classmethod
    def from_dir(cls, path: Path, config: dict) -> Tokenizer:
        """tokenizer.json, or GPT-2's vocab.json + merges.txt, plus tokenizer_config.json."""
        if (path / "tokenizer.json").exists():
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            tok = HFTokenizer(
                models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
            )
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            tok.add_special_tokens(["<|endoftext|>"])
        else:
            raise FileNotFoundError(
                f"no tokenizer in {path}: expected tokenizer.json or vocab.json + merges.txt"
            )
        tok_config: dict = {}
        if (path / "tokenizer_config.json").exists():
            tok_config = json.loads((path / "tokenizer_config.json").read_text())
        template = tok_config.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        special = {
            name: content
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (content := _token_content(tok_config.get(name))) is not None
        }
        eos_ids = config.get("eos_token_id")
        eos = set(
            eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
        )
        if "eos_token" in special and (tid := tok.token_to_id(special["eos_token"])) is not None:
            eos.add(tid)
        bos = config.get("bos_token_id")
        if "bos_token" in special and (tid := tok.token_to_id(special["bos_token"])) is not None:
            bos = tid
        add_bos = bool(tok_config.get("add_bos_token", False))
        return cls(tok, eos, bos, add_bos, template, special)
