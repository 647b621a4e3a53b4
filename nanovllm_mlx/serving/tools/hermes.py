"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
one block per call."""

from __future__ import annotations

from typing import Any

from nanovllm_mlx.serving.tools.parser import (
    ToolParser,
    call_schema,
    json_call,
    lark_json,
    loads,
)
from nanovllm_mlx.serving.tools.pieces import Call


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"
    template_hints = ("<tool_call>",)

    def decode(self, body: str) -> list[Call] | None:
        call = json_call(loads(body.strip()))
        return None if call is None else [call]

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        start, end = self.lark_marker(self.start), self.lark_marker(self.end)
        one = f'{start} "\\n" call "\\n" {end}'
        start = f'start: block ("\\n" block)*\nblock: {one}' if parallel else f"start: {one}"
        return f"{start}\ncall: {lark_json(call_schema(functions))}\n"
