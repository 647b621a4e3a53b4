"""Tool calling and reasoning through the server and the official `openai` client, on the
random qwen2-tiny model with a Qwen2.5 tool template: it was never trained for tools, so a
valid call proves the constraint (tool_choice required or named)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from chat_templates import (
    MISTRAL_TOOLS,
    QWEN3_THINKING,
    QWEN25_TOOLS,
    R1_THINKING,
    with_template,
)
from helpers import JSON, SMALL_KV, assert_error, serving

MODEL = "qwen-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            # A random model would otherwise add keys until max_tokens.
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def app(qwen2_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from nanovllm_mlx.serving.app import create_app

    model = with_template(qwen2_tiny, tmp_path_factory.mktemp("m") / MODEL, QWEN25_TOOLS)
    return create_app(str(model), **SMALL_KV)


def _create(client: openai.OpenAI, **kw: Any) -> Any:
    args = {"model": MODEL, "messages": ASK, "max_tokens": 120, "temperature": 0}
    args.update(kw)
    return client.chat.completions.create(**args)


def _streamed(client: openai.OpenAI, **kw: Any) -> tuple[str | None, list[tuple], str | None]:
    """A stream's content, calls (name, arguments) assembled from deltas, finish reason."""
    content, calls, finish = None, {}, None
    for chunk in _create(client, stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for c in delta.tool_calls or []:
                if c.index not in calls:
                    assert c.id and c.function and c.function.name  # id and name first
                    calls[c.index] = [c.function.name, ""]
                calls[c.index][1] += c.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(v) for _, v in sorted(calls.items())], finish


def _calls(message: Any) -> list[tuple]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_required_gives_a_valid_call_streamed_the_same(client: openai.OpenAI):
    kw = {"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False}
    r = _create(client, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert isinstance(args["city"], str) and len(args["city"]) <= 12
    else:
        assert args["zone"] in ("UTC", "CET")
    assert _streamed(client, **kw) == (None, _calls(choice.message), "tool_calls")


def test_named_choice_calls_that_function(client: openai.OpenAI):
    choice = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = _create(client, tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        [(name, args)] = _calls(r.choices[0].message)
        assert name == "get_time" and json.loads(args)["zone"] in ("UTC", "CET")


def test_required_parallel_calls_are_all_valid(client: openai.OpenAI):
    r = _create(
        client,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=1.0,
        seed=3,
        max_tokens=220,
    )
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":  # else max_tokens cut a call: it is content
        assert choice.message.tool_calls and choice.message.content is None
        for c in choice.message.tool_calls:
            assert c.function.name in ("get_weather", "get_time")
            json.loads(c.function.arguments)
    else:
        assert choice.finish_reason == "length" and choice.message.content


def test_auto_and_none_answer_in_text(client: openai.OpenAI):
    for choice in ("auto", "none"):
        r = _create(client, tools=[WEATHER], tool_choice=choice, max_tokens=8)
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].message.tool_calls is None
        assert isinstance(r.choices[0].message.content, str)


def test_tools_reach_the_template(client: openai.OpenAI):
    plain = _create(client, max_tokens=1).usage.prompt_tokens
    with_tools = _create(client, tools=[WEATHER], max_tokens=1).usage.prompt_tokens
    assert with_tools > plain + 30  # the tool's schema and the format's instructions
    none = _create(client, tools=[WEATHER], tool_choice="none", max_tokens=1).usage.prompt_tokens
    assert none == plain


def test_multi_turn_tool_loop(client: openai.OpenAI):
    """The agent loop a client runs: call, run the tool, send the result back, answer."""
    messages: list[Any] = list(ASK)
    r = _create(
        client,
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assistant = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", assistant
    messages.append(assistant.model_dump(exclude_none=True))
    [call] = assistant.tool_calls
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'})
    before = r.usage.prompt_tokens
    r = _create(client, messages=messages, tools=[WEATHER], max_tokens=5)
    assert r.choices[0].message.content is not None
    # The call and its result are in the prompt: the history was kept, not dropped.
    assert r.usage.prompt_tokens > before + 20


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    }
                ]
            },
            "messages.0.tool_calls",
        ),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        (  # JSON nested past the parser's recursion limit
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[" * 100_000},
                            }
                        ],
                    }
                ]
            },
            "messages.0.tool_calls",
        ),
    ],
)
def test_bad_tool_requests_are_400(base_url: str, body: dict, param: str):
    full = {"model": MODEL, "messages": ASK, "max_tokens": 4, **body}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=full, headers=JSON, timeout=60)
    assert_error(r, 400, param)


# A <think> template: the generation prompt opens the block (DeepSeek-R1 style) ---------------


def served_with_template(
    qwen2_tiny: Path, factory: pytest.TempPathFactory, name: str, template: str
) -> Iterator[str]:
    """The qwen2-tiny model served under `name` with another chat template."""
    from nanovllm_mlx.serving.app import create_app

    model = with_template(qwen2_tiny, factory.mktemp(name) / name, template)
    with serving(create_app(str(model), **SMALL_KV)) as url:
        yield url


@pytest.fixture(scope="module")
def thinking_url(qwen2_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from served_with_template(qwen2_tiny, tmp_path_factory, "r1", R1_THINKING)


def test_opened_think_goes_to_reasoning_in_both_modes(thinking_url: str):
    client = openai.OpenAI(base_url=f"{thinking_url}/v1", api_key="x", max_retries=0)
    kw: dict[str, Any] = {"model": "r1", "messages": ASK, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kw).choices[0]
    reasoning = whole.message.model_extra["reasoning_content"]
    assert reasoning  # a random model never closes the block: all of it is thinking
    assert whole.message.content == ""
    streamed = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        assert not delta.content
        streamed += (delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == reasoning


@pytest.fixture(scope="module")
def qwen3_url(qwen2_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from served_with_template(qwen2_tiny, tmp_path_factory, "q3", QWEN3_THINKING)


def test_template_kwargs_and_reasoning_effort_reach_the_template(qwen3_url: str):
    client = openai.OpenAI(base_url=f"{qwen3_url}/v1", api_key="x", max_retries=0)

    def prompt_tokens(**extra: Any) -> int:
        kw: dict[str, Any] = {"model": "q3", "messages": ASK, "max_tokens": 1}
        r = client.chat.completions.create(**kw, extra_body=extra)
        assert r.choices[0].message.content is not None  # no think block: an answer
        return r.usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) > plain
    assert prompt_tokens(reasoning_effort="low") > plain


# A marker that is a special token (Mistral's [TOOL_CALLS]): the detokenizer drops it -------


@pytest.fixture(scope="module")
def mistral_url(qwen2_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from nanovllm_mlx.serving.app import create_app

    out = tmp_path_factory.mktemp("mi") / "mistral"
    model = with_template(qwen2_tiny, out, MISTRAL_TOOLS, special=("[TOOL_CALLS]",))
    with serving(create_app(str(model), **SMALL_KV)) as url:
        yield url


def test_special_token_marker_found_by_id(mistral_url: str):
    client = openai.OpenAI(base_url=f"{mistral_url}/v1", api_key="x", max_retries=0)
    kw = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    r = client.chat.completions.create(
        model="mistral", messages=ASK, max_tokens=120, temperature=0, logprobs=True, **kw
    )
    choice = r.choices[0]
    # The grammar wrote the special token itself, as a Mistral model does.
    assert choice.logprobs.content[0].token == "[TOOL_CALLS]"
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [(name, args)] = _calls(choice.message)
    assert name == "get_weather" and set(json.loads(args)) == {"city"}
    content, calls, finish = _streamed(client, model="mistral", **kw)
    assert (content, calls, finish) == (None, [(name, args)], "tool_calls")


def test_required_after_an_opened_think_lets_the_thinking_through(thinking_url: str):
    """The call is constrained after the block ends (the grammar itself is tested in
    test_tool_formats): a random model never ends it, so all it writes is reasoning."""
    client = openai.OpenAI(base_url=f"{thinking_url}/v1", api_key="x", max_retries=0)
    kw: dict[str, Any] = {"model": "r1", "messages": ASK, "max_tokens": 12, "temperature": 0}
    kw.update(tools=[WEATHER], tool_choice="required")
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.model_extra["reasoning_content"] and not choice.message.content
    json_kw = {**kw, "tools": None, "tool_choice": None}
    json_kw["response_format"] = {"type": "json_object"}
    # response_format has no think prefix: constrained, and content, from the first token.
    choice = client.chat.completions.create(**json_kw).choices[0]
    assert choice.message.content.startswith("{")
    assert not choice.message.model_extra.get("reasoning_content")


def test_unusable_tool_schema_is_named_in_the_400(base_url: str):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nope"}}}
    body = {"model": MODEL, "messages": ASK, "tools": [bad], "tool_choice": "required"}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=JSON, timeout=60)
    error = assert_error(r, 400, "tools")
    assert error["message"].startswith("the tools cannot constrain a call: ")
    assert "/nope" in error["message"] and "\n" not in error["message"]
