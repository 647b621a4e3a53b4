"""LLM.chat's tools and reasoning: the server's parsers and tool grammars, for a
conversation run in-process."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.sampling_params import SamplingParams
from nanovllm_mlx.serving.chat_output import ChoiceOutput, message
from nanovllm_mlx.serving.reasoning import (
    THINK_TAGS,
    ThinkSplitter,
    after_thinking,
    prompt_opens_thinking,
    template_thinks,
)
from nanovllm_mlx.serving.tools.registry import parser_for

ChoiceFactory = Callable[[], ChoiceOutput]


def _history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped messages for the template: content never None, call arguments as
    objects (templates write them with tojson)."""
    out = []
    for m in messages:
        m = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _arguments(function: dict[str, Any]) -> Any:
    args = function.get("arguments", {})
    return json.loads(args) if isinstance(args, str) else args


def chat_request(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    params: SamplingParams | None,
    tools: list[dict[str, Any]] | None,
    choice: tuple[str | dict[str, Any], bool],
    template_kwargs: dict[str, Any],
) -> tuple[list[int], SamplingParams | None, ChoiceFactory]:
    """The prompt, the sampling parameters (with the tool grammar when the choice, a
    tool_choice and parallel_tool_calls, asks for a call) and a factory of each choice's
    parser."""
    tool_choice, parallel = choice
    use_tools = bool(tools) and tool_choice != "none"
    kwargs = {**template_kwargs, **({"tools": tools} if use_tools else {})}
    text = tokenizer.apply_chat_template(_history(messages), **kwargs)
    parser = parser_for(tokenizer.chat_template) if use_tools else None
    thinks = template_thinks(tokenizer.chat_template)
    opened = thinks and prompt_opens_thinking(text)
    lets_think = False
    if use_tools and tool_choice != "auto":
        assert parser is not None and tools is not None
        functions = [t["function"] for t in tools]
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            functions = [f for f in functions if f["name"] == name]
            if not functions:
                raise InvalidRequestError(f"tool_choice names {name!r}, not in tools", "tools")
        elif tool_choice != "required":
            raise InvalidRequestError(f"unknown tool_choice {tool_choice!r}", "tool_choice")
        specials = special_ids(tokenizer)
        grammar = parser(tools, specials).grammar(functions, parallel and tool_choice == "required")
        # The call comes after the thinking, as the server's does (serving/chat.py).
        thinking_first = after_thinking(grammar, opened, specials) if thinks else None
        lets_think = thinking_first is not None
        params = dataclasses.replace(params or SamplingParams(), grammar=thinking_first or grammar)
    if params is not None and params.structured and not lets_think:
        opened = False  # constrained from the first token: not in the opened block

    def choice_output() -> ChoiceOutput:
        return ChoiceOutput(
            parser(tools) if parser else None, ThinkSplitter(opened) if thinks else None
        )

    return tokenizer.encode_text(text), params, choice_output


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    return {t.content: i for i, t in added.items() if t.special}


def with_markers(tokenizer: Tokenizer, token_ids: list[int], markers: dict[int, str]) -> str:
    """The output's text with the markers that are special tokens kept: the text between
    them decoded as usual, special tokens skipped."""
    parts, run = [], []
    for t in token_ids:
        if t in markers:
            parts += [tokenizer.decode(run), markers[t]]
            run = []
        else:
            run.append(t)
    return "".join([*parts, tokenizer.decode(run)])


def parse_result(result: dict, choice_output: ChoiceFactory, tokenizer: Tokenizer) -> dict:
    probe = choice_output()
    texts = [probe.parser.start, probe.parser.end or ""] if probe.parser else []
    texts += list(THINK_TAGS) if probe.thinking else []
    markers = {i: t for t, i in special_ids(tokenizer).items() if t in texts}
    for choice in result["outputs"]:
        text = choice["text"]
        if markers and any(t in markers for t in choice["token_ids"]):
            text = with_markers(tokenizer, choice["token_ids"], markers)
        deltas, reason = choice_output().step(text, True, choice["finish_reason"])
        parsed = message(deltas).model_dump(exclude={"role"})
        choice.update(
            content=parsed["content"],
            reasoning_content=parsed.get("reasoning_content"),
            tool_calls=parsed.get("tool_calls") or [],
            finish_reason=reason,
        )
    first = result["outputs"][0]
    result.update({k: first[k] for k in ("content", "reasoning_content", "tool_calls")})
    result["finish_reason"] = first["finish_reason"]
    return result
