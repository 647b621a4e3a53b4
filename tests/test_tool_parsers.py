"""Tool-call parsers and the reasoning split, fed text directly: every format's calls are
the same however the text is split (at every token boundary of a real tokenizer), and
malformed calls end as content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.serving.chat_output import ChoiceOutput, message
from nanovllm_mlx.serving.protocol import AssistantMessage, Delta
from nanovllm_mlx.serving.reasoning import ThinkSplitter, prompt_opens_thinking
from nanovllm_mlx.serving.tools.parser import ToolParser
from nanovllm_mlx.serving.tools.registry import PARSERS, parser_for

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
TIME = {"name": "get_time", "arguments": {}}

# Each family's output for two calls, after some text where the format allows it.
OUTPUTS = {
    "hermes": (
        "Let me check.\n<tool_call>\n"
        + json.dumps(WEATHER)
        + "\n</tool_call>\n<tool_call>\n"
        + json.dumps(TIME)
        + "\n</tool_call>"
    ),
    "llama3_json": (
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
        '{"name": "get_time", "parameters": {}}'
    ),
    "mistral": "Let me check.[TOOL_CALLS]" + json.dumps([WEATHER, TIME]),
    "mistral_v11": (
        'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}'
        "[TOOL_CALLS]get_time[ARGS]{}"
    ),
    "qwen3_coder": (
        "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_time>\n</function>\n</tool_call>"
    ),
}
CONTENT = {"llama3_json": None}  # the others: "Let me check."


def parser(name: str) -> type[ToolParser]:
    return PARSERS[name.removesuffix("_v11")]


def _tokenizer(qwen2_tiny: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen2_tiny, json.loads((qwen2_tiny / "config.json").read_text()))


def token_pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    """text as the engine streams it: one detokenized piece per token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = tokenizer.detokenizer([])
    return [stream.step(i) for i in ids]


def run(
    parser: type[ToolParser] | None,
    chunks: list[str],
    thinking: bool | None = None,
    reason: str = "stop",
) -> tuple[AssistantMessage, str | None, list[Delta]]:
    out = ChoiceOutput(
        parser() if parser else None, None if thinking is None else ThinkSplitter(thinking)
    )
    deltas: list[Delta] = []
    for chunk in chunks:
        deltas += out.step(chunk, False, None)[0]
    last, finish = out.step("", True, reason)
    deltas += last
    return message(deltas), finish, deltas


def shape(m: AssistantMessage) -> tuple:
    """A message less its random call ids."""
    calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
    return m.content, m.reasoning_content, calls


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_calls_parsed(name: str):
    m, finish, _ = run(parser(name), [OUTPUTS[name]])
    assert finish == "tool_calls"
    assert m.content == CONTENT.get(name, "Let me check.")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []] == [
        (WEATHER["name"], WEATHER["arguments"]),
        (TIME["name"], TIME["arguments"]),
    ]
    assert len({c.id for c in m.tool_calls or []}) == 2


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_stream_equals_whole_at_every_token_boundary(name: str, qwen2_tiny: Path):
    text = OUTPUTS[name]
    whole = shape(run(parser(name), [text])[0])
    assert len(whole[2]) == 2
    pieces = token_pieces(_tokenizer(qwen2_tiny), text)
    assert "".join(pieces) == text
    assert shape(run(parser(name), pieces)[0]) == whole  # a token at a time
    for cut in range(1, len(pieces)):  # and split in two at every token boundary
        halves = ["".join(pieces[:cut]), "".join(pieces[cut:])]
        assert shape(run(parser(name), halves)[0]) == whole, cut
    for cut in range(1, len(text)):  # and at every character
        assert shape(run(parser(name), [text[:cut], text[cut:]])[0]) == whole, cut


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_stream_deltas_send_id_and_name_first(name: str):
    _, _, deltas = run(parser(name), list(OUTPUTS[name]))
    calls = [c for d in deltas for c in d.tool_calls or []]
    assert [c.index for c in calls] == [0, 0, 1, 1]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert calls[1].id is None and calls[1].function.name is None
    markup = ("<tool_call>", "[TOOL_CALLS]", "<function", '"name"')
    assert not any(m in (d.content or "") for d in deltas for m in markup)


@pytest.mark.parametrize(
    "text",
    [
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": ',  # unclosed
        '<tool_call>\n{"name": "get_weather", "arguments": {oops}}\n</tool_call>',  # bad JSON
        "<tool_call>\n[1, 2]\n</tool_call>",  # not a call
    ],
)
def test_malformed_call_is_content(text: str):
    for chunks in ([text], list(text)):
        m, finish, _ = run(PARSERS["hermes"], chunks, reason="length")
        assert m.tool_calls is None
        assert m.content == text
        assert finish == "length"


def test_text_that_only_looks_like_a_marker_streams_as_content():
    text = "a <tool> and <tool_cal but no call"
    m, finish, _ = run(PARSERS["hermes"], list(text))
    assert (m.content, m.tool_calls, finish) == (text, None, "stop")


def test_malformed_in_every_format_is_content():
    for name, text in {
        "llama3_json": '{"name": "f", "parameters": {"a": ',
        "mistral": "ok[TOOL_CALLS][{oops}]",
        "mistral_v11": "ok[TOOL_CALLS]f[ARGS]{",
        "qwen3_coder": "ok<tool_call>\n<function=f>\n<parameter=a>\n1\n</tool_call>",
    }.items():
        m, finish, _ = run(parser(name), list(text), reason="length")
        assert (m.content, m.tool_calls, finish) == (text, None, "length"), name


def test_llama3_json_only_at_the_start():
    text = 'The format is {"name": "f", "parameters": {}}'
    m, finish, _ = run(PARSERS["llama3_json"], list(text))
    assert (m.content, m.tool_calls, finish) == (text, None, "stop")


def test_qwen3_coder_reads_values_by_schema():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "properties": {
                        "n": {"type": "integer"},
                        "s": {"type": "string"},
                        "o": {"type": "object"},
                    }
                },
            },
        }
    ]
    text = (
        "<tool_call>\n<function=f>\n<parameter=n>\n5\n</parameter>\n<parameter=s>\n5"
        '\n</parameter>\n<parameter=o>\n{"k": [1]}\n</parameter>\n</function>\n</tool_call>'
    )
    out = ChoiceOutput(PARSERS["qwen3_coder"](tools), None)
    m = message(out.step(text, True, "stop")[0])
    assert json.loads(m.tool_calls[0].function.arguments) == {"n": 5, "s": "5", "o": {"k": [1]}}


def test_parser_from_template_and_override():
    assert parser_for("... <tool_call> ...") is PARSERS["hermes"]
    assert parser_for(None) is PARSERS["hermes"]  # the default for templates without tools
    with pytest.raises(ValueError, match="unknown tool call parser"):
        parser_for("x", "nonesuch")


# Reasoning ---------------------------------------------------------------------------------

THOUGHT = "<think>\nThe user wants the weather.\n</think>\n\nIt is sunny."


def test_think_split_every_boundary():
    whole = shape(run(None, [THOUGHT], thinking=False)[0])
    assert whole == ("It is sunny.", "\nThe user wants the weather.\n", [])
    for cut in range(1, len(THOUGHT)):
        assert shape(run(None, [THOUGHT[:cut], THOUGHT[cut:]], thinking=False)[0]) == whole


def test_prompt_that_opened_think_starts_in_reasoning():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    m, _, _ = run(None, list("mulling it over</think>\n\nYes."), thinking=True)
    assert shape(m) == ("Yes.", "mulling it over", [])


def test_unclosed_think_is_reasoning_and_no_think_is_content():
    assert shape(run(None, ["<think>still going"], thinking=False, reason="length")[0]) == (
        "",
        "still going",
        [],
    )
    assert shape(run(None, list("plain <think> answer"), thinking=False)[0]) == (
        "plain <think> answer",
        None,
        [],
    )


def test_reasoning_then_tool_call():
    text = "<think>I need the tool.</think>\n<tool_call>\n" + json.dumps(TIME) + "\n</tool_call>"
    m, finish, _ = run(PARSERS["hermes"], list(text), thinking=False)
    assert finish == "tool_calls"
    assert shape(m) == (None, "I need the tool.", [("get_time", "{}")])


def test_command_line_offers_every_parser():
    from nanovllm_mlx.serving.tools.names import PARSER_NAMES

    assert sorted(PARSER_NAMES) == sorted(PARSERS)
