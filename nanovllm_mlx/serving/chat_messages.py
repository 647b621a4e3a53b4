"""A chat request's messages and template variables as the chat template takes them."""

from __future__ import annotations

import json
from typing import Any

from nanovllm_mlx.serving.errors import bad_request
from nanovllm_mlx.serving.protocol import ChatCompletionRequest, ChatMessage


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts. An assistant's tool call arguments become objects, as templates (Qwen's,
    Llama's) write them with tojson, and as vLLM and transformers hand them over."""
    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise bad_request("only text content parts are supported", f"messages.{i}")
            content = "".join(p.text or "" for p in content)
        # None is "" for templates that concatenate content; Qwen's test it for truth.
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments, i),
                    },
                }
                for c in m.tool_calls
            ]
        plain.append(message)
    return plain


def _arguments(text: str, i: int) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # json.loads of deep nesting
        raise bad_request(
            "a tool call's function.arguments must be JSON", f"messages.{i}.tool_calls"
        ) from None


def template_kwargs(
    body: ChatCompletionRequest, tools: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """The template's variables beyond messages: the request's chat_template_kwargs
    (enable_thinking, ...), reasoning_effort and the tools."""
    kwargs: dict[str, Any] = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    if tools:
        kwargs["tools"] = tools
    reserved = {"messages", "add_generation_prompt"} & kwargs.keys()
    if reserved:
        raise bad_request(
            f"chat_template_kwargs cannot set {sorted(reserved)[0]}", "chat_template_kwargs"
        )
    return kwargs
