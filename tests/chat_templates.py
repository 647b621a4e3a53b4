"""Chat templates (tests/templates/*.jinja) that write each tool-call family's format, for
the tiny fixtures (whose own ChatML template knows no tools), and the helper that gives a
fixture one of them.

qwen25_tools: Qwen2.5-Instruct's template as Qwen ships it (Hermes <tool_call> format).
qwen3_thinking: ChatML with Qwen3's enable_thinking switch (false writes an empty block).
r1_thinking: DeepSeek-R1 style, the generation prompt opens the <think> block itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


QWEN25_TOOLS = template("qwen25_tools")
QWEN3_THINKING = template("qwen3_thinking")
R1_THINKING = template("r1_thinking")
MISTRAL_TOOLS = template("mistral_tools")


def with_template(
    fixture: Path, out: Path, chat_template: str, special: tuple[str, ...] = ()
) -> Path:
    """A copy of a fixture model directory whose chat template is chat_template, and
    whose tokenizer has the special tokens `special` added (the fixtures' vocabularies
    are padded: the new ids are inside the model's)."""
    from tokenizers import AddedToken, Tokenizer

    shutil.copytree(fixture, out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config))
    if special:
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
        tok.save(str(out / "tokenizer.json"))
    return out
