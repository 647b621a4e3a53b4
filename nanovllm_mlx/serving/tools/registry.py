"""The tool-call parsers by name, and the one a chat template writes."""

from __future__ import annotations

from nanovllm_mlx.serving.tools.hermes import HermesParser
from nanovllm_mlx.serving.tools.llama3 import Llama3JsonParser
from nanovllm_mlx.serving.tools.mistral import MistralParser
from nanovllm_mlx.serving.tools.parser import ToolParser
from nanovllm_mlx.serving.tools.qwen3_coder import Qwen3CoderParser

# In the order templates are matched: Qwen3-Coder's template also writes <tool_call>.
PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (Qwen3CoderParser, MistralParser, Llama3JsonParser, HermesParser)
}
DEFAULT_PARSER = HermesParser  # for templates that show no format: models know it best


def parser_for(template: str | None, override: str | None = None) -> type[ToolParser]:
    """--tool-call-parser when given, else the format the chat template writes."""
    if override is not None:
        if override not in PARSERS:
            raise ValueError(
                f"unknown tool call parser {override!r}; known: {', '.join(sorted(PARSERS))}"
            )
        return PARSERS[override]
    for parser in PARSERS.values():
        if template and any(hint in template for hint in parser.template_hints):
            return parser
    return DEFAULT_PARSER
