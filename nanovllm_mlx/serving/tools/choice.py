"""A request's tools and tool_choice as what the chat endpoint needs: the parser for the
model's format, the tools for the template, and the grammar that makes "required" or a
named function a guarantee (vLLM's approach: the calls' JSON schema, here inside the
format's markers, enforced by llguidance)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import llguidance

from nanovllm_mlx.serving.errors import bad_request
from nanovllm_mlx.serving.protocol import ChatCompletionRequest
from nanovllm_mlx.serving.tools.parser import ToolParser


@dataclass(frozen=True)
class ToolSetup:
    parser: type[ToolParser] | None  # None: tool calls are not looked for
    template_tools: list[dict[str, Any]] | None  # what the chat template gets as `tools`
    grammar: str | None  # the constraint for "required" and named choices


def tool_setup(
    body: ChatCompletionRequest, parser: type[ToolParser], specials: dict[str, int]
) -> ToolSetup:
    """specials: the tokenizer's special tokens by text, for markers that are one."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none" or not tools:
        if choice not in ("none", "auto"):
            raise bad_request(f"tool_choice {_shown(choice)} needs tools", "tool_choice")
        return ToolSetup(None, None, None)
    if choice == "auto":
        return ToolSetup(parser, tools, None)
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request(
            "response_format cannot be combined with a required or named tool_choice",
            "response_format",
        )
    if choice == "required":
        chosen = tools
    else:
        assert not isinstance(choice, str)
        name = choice.function.name
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    parallel = body.parallel_tool_calls is not False and choice == "required"
    grammar = parser(tools, specials).grammar([t["function"] for t in chosen], parallel)
    # Checked here, so that the 400 speaks of the tools rather than of a grammar the client
    # never wrote; the first line names the problem, the rest quotes the grammar.
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        reason = re.sub(r"^at \d+\(\d+\): ", "", error.splitlines()[0])
        raise bad_request(f"the tools cannot constrain a call: {reason}", "tools")
    return ToolSetup(parser, tools, grammar)


def _shown(choice: object) -> str:
    return repr(choice) if isinstance(choice, str) else "naming a function"
