"""gpt-oss's harmony channels -> reasoning_content, content and tool calls (serving/harmony.py),
through the same ChoiceOutput a chat completion uses, whole and streamed in every split."""

from __future__ import annotations

import json

import pytest

from nanovllm_mlx.serving.chat_output import ChoiceOutput, message
from nanovllm_mlx.serving.harmony import HarmonySplitter, template_is_harmony

ANSWER = (
    "<|channel|>analysis<|message|>User asks for 2+2. Easy: 4.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
)
CALL = (
    "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)
# The recipient may come before the channel (harmony allows both orders).
CALL_RECIPIENT_FIRST = (
    '<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>{"q": 1}<|call|>'
)


def run(text: str, cuts: list[int]) -> tuple[object, str | None]:
    out = ChoiceOutput(None, HarmonySplitter())
    deltas, bounds = [], [0, *cuts, len(text)]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        last = i == len(bounds) - 2
        got, reason = out.step(text[a:b], last, "stop" if last else None)
        deltas += got
    return message(deltas), reason


@pytest.mark.parametrize("step", [None, 1, 3, 7])
def test_reasoning_and_answer(step: int | None):
    cuts = [] if step is None else list(range(step, len(ANSWER), step))
    msg, reason = run(ANSWER, cuts)
    assert msg.reasoning_content == "User asks for 2+2. Easy: 4."
    assert msg.content == "2 + 2 = 4." and msg.tool_calls is None and reason == "stop"


@pytest.mark.parametrize("text, name, args", [
    (CALL, "get_weather", {"city": "Paris"}),
    (CALL_RECIPIENT_FIRST, "lookup", {"q": 1}),
])  # fmt: skip
@pytest.mark.parametrize("step", [None, 1, 5])
def test_tool_call_from_the_commentary_channel(text: str, name: str, args: dict, step):
    cuts = [] if step is None else list(range(step, len(text), step))
    msg, reason = run(text, cuts)
    assert reason == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.function.name == name and json.loads(call.function.arguments) == args


def test_no_marker_half_leaks_into_the_text():
    splitter = HarmonySplitter()
    pieces = splitter.feed("<|channel|>final<|message|>Hello<|re")
    assert [p.text for p in pieces] == ["Hello"]
    assert splitter.feed("turn|>") == [] and splitter.finish() == []


def test_cut_short_and_malformed_outputs():
    # The length limit inside the reasoning: what was thought is still reasoning.
    msg, _ = run("<|channel|>analysis<|message|>Thinking about", [])
    assert msg.reasoning_content == "Thinking about" and not msg.content
    # A call cut short is not a call (its arguments are no JSON): shown as text.
    msg, reason = run('<|channel|>commentary to=functions.f<|message|>{"a": ', [])
    assert msg.tool_calls is None and msg.content == '{"a": ' and reason == "stop"
    # Commentary without a recipient (a preamble to the user) is content.
    msg, _ = run("<|channel|>commentary<|message|>Checking.<|end|>", [])
    assert msg.content == "Checking."
    # A model that writes no harmony at all: its text is the answer.
    msg, _ = run("Just text.", [2])
    assert msg.content == "Just text." and msg.reasoning_content is None
    # Markers alone are not an answer.
    msg, _ = run("<|channel|>final", [])
    assert not msg.content


def test_the_gpt_oss_template_is_recognized():
    assert template_is_harmony("{{ '<|start|>assistant<|channel|>final<|message|>' }}")
    assert not template_is_harmony("{{ '<think>' }}") and not template_is_harmony(None)
