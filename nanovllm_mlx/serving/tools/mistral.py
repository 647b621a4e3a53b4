"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers) or
`[TOOL_CALLS]name[ARGS]{...}` per call (v11+), to the end of the answer.

`[TOOL_CALLS]` is a special token in Mistral's tokenizers: the detokenizer drops it, so the
chat renderer puts it back by token id (chat_output.output_text)."""

from __future__ import annotations

import re
from typing import Any

from nanovllm_mlx.serving.tools.parser import (
    ToolParser,
    call_schema,
    json_call,
    lark_json,
    loads,
)
from nanovllm_mlx.serving.tools.pieces import Call

_ARGS = "[ARGS]"
_NAME = re.compile(r"\s*([A-Za-z0-9_.-]{1,64})$")


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    end = None
    template_hints = ("[TOOL_CALLS]",)

    def decode(self, body: str) -> list[Call] | None:
        if _ARGS in body:
            return self._decode_v11(body)
        parsed = loads(body.strip())
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = [c for c in map(json_call, items) if c is not None]
        return calls if calls and len(calls) == len(items) else None

    def _decode_v11(self, body: str) -> list[Call] | None:
        # name[ARGS]{json}[TOOL_CALLS]name[ARGS]{json}...
        calls: list[Call] = []
        for part in body.split(self.start):
            name, sep, args = part.partition(_ARGS)
            match = _NAME.match(name)
            if not sep or match is None:
                return None
            call = json_call({"name": match.group(1), "arguments": loads(args.strip())})
            if call is None:
                return None
            calls.append(call)
        return calls

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        more = ' (", " call)*' if parallel else ""
        call = lark_json(call_schema(functions))
        return f'start: {self.lark_marker(self.start)} "[" call{more} "]"\ncall: {call}\n'
