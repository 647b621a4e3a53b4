"""Llama 3.1-3.3 JSON tool calls: the whole answer is `{"name": ..., "parameters": {...}}`
(several joined by "; "), after an optional `<|python_tag|>` that the detokenizer drops
as a special token. Recognised only at the start of the answer, as the model writes it;
an answer that starts with other text is content."""

from __future__ import annotations

import json
from typing import Any

from nanovllm_mlx.serving.tools.parser import ToolParser, call_schema, json_call, lark_json
from nanovllm_mlx.serving.tools.pieces import Call


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start = "{"
    end = None
    at_start_only = True
    template_hints = ("<|python_tag|>", "dictionary of argument name and its value")

    def decode(self, body: str) -> list[Call] | None:
        text, calls, decoder = "{" + body, [], json.JSONDecoder()
        at = 0
        while True:
            try:
                obj, at = decoder.raw_decode(text, at)
            except (ValueError, RecursionError):  # deep nesting: not a call either
                return None
            key = "parameters" if isinstance(obj, dict) and "parameters" in obj else "arguments"
            call = json_call(obj, key)
            if call is None:
                return None
            calls.append(call)
            rest = text[at:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(";"):
                return None
            at = len(text) - len(rest) + 1
            at += len(text[at:]) - len(text[at:].lstrip())

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return f"{start}\ncall: {lark_json(call_schema(functions, 'parameters'))}\n"
