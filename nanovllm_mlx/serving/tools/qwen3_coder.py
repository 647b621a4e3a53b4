"""Qwen3-Coder's XML calls:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Values are text; each is read by its parameter's type in the request's schema (a string
stays as written, anything else is JSON), as Qwen's own parser does."""

from __future__ import annotations

import json
import re
from typing import Any

from nanovllm_mlx.serving.tools.parser import ToolParser, lark_json, lark_literal
from nanovllm_mlx.serving.tools.pieces import Call

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.S)
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>\s*", re.S)
# A string value is raw text to its closing tag: bounded, so a model cannot ramble on.
MAX_TEXT_VALUE = 256


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    start = "<tool_call>"
    end = "</tool_call>"
    template_hints = ("<function=",)

    def decode(self, body: str) -> list[Call] | None:
        match = _FUNCTION.fullmatch(body)
        if match is None:
            return None
        name, inner = match.group(1).strip(), match.group(2)
        properties = (self.functions.get(name, {}).get("parameters") or {}).get("properties", {})
        args: dict[str, Any] = {}
        at = 0
        for param in _PARAMETER.finditer(inner):
            if inner[at : param.start()].strip():
                return None  # text between parameters: not this format
            at = param.end()
            key, raw = param.group(1).strip(), param.group(2)
            args[key] = _value(raw, properties.get(key, {}))
        if inner[at:].strip():
            return None
        return [Call(name, json.dumps(args, ensure_ascii=False))]

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        rules = []
        for i, f in enumerate(functions):
            schema = f.get("parameters") or {}
            properties = schema.get("properties", {})
            parts = [lark_literal(f"<function={f['name']}>\n")]
            # The required parameters, in the schema's order: enough for a valid call.
            for j, key in enumerate(k for k in properties if k in schema.get("required", [])):
                rule = f"v{i}_{j}"
                rules.append(f"{rule}: {_value_rule(properties[key])}")
                parts += [lark_literal(f"<parameter={key}>\n"), rule]
                parts.append(lark_literal("\n</parameter>\n"))
            parts.append(lark_literal("</function>"))
            rules.append(f"f{i}: {' '.join(parts)}")
        names = " | ".join(f"f{i}" for i in range(len(functions)))
        start, end = self.lark_marker(self.start), self.lark_marker(self.end)
        block = f'{start} "\\n" ({names}) "\\n" {end}'
        start = 'start: block ("\\n" block)*' if parallel else "start: block"
        return "\n".join([start, f"block: {block}", *rules]) + "\n"


def _value_rule(schema: dict[str, Any]) -> str:
    """A parameter's value as the format writes it: a string as raw text, anything else
    as JSON (which is how numbers and booleans are written as text too)."""
    if schema.get("type") != "string":
        return lark_json(schema)
    if "enum" in schema:
        return " | ".join(lark_literal(str(v)) for v in schema["enum"])
    low = max(1, int(schema.get("minLength", 1)))
    high = max(low, min(int(schema.get("maxLength", MAX_TEXT_VALUE)), MAX_TEXT_VALUE))
    return f"/[^<\\n]{{{low},{high}}}/"


def _value(raw: str, schema: dict[str, Any]) -> Any:
    if schema.get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # deep nesting: not a call either
        return raw  # an untyped or mistyped value: as written
