"""Each tool-call family on real template output, and each family's grammar on the engine:
the templates in tests/templates write a history's calls, the parser the template selects
reads them back; a random model constrained by a family's grammar writes a call that
parses and fits the function's schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chat_templates import template
from helpers import SMALL_KV

from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.serving.chat_messages import template_messages
from nanovllm_mlx.serving.chat_output import ChoiceOutput, message
from nanovllm_mlx.serving.protocol import ChatMessage
from nanovllm_mlx.serving.tools.registry import PARSERS, parser_for

TEMPLATES = {
    "qwen25_tools": "hermes",
    "llama3_tools": "llama3_json",
    "mistral_tools": "mistral",
    "qwen3_coder_tools": "qwen3_coder",
}
# What the detokenizer drops (special tokens) or ends a turn with.
TURN_ENDS = ("<|python_tag|>", "<|eom_id|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>")
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "days": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    }
]
CALLS = [
    ("get_weather", {"city": "Paris", "days": 3}),
    ("get_weather", {"city": "Oslo", "days": 1}),
]


def _tokenizer(qwen2_tiny: Path, chat_template: str) -> Tokenizer:
    config = json.loads((qwen2_tiny / "config.json").read_text())
    tok = Tokenizer.from_dir(qwen2_tiny, config)
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    return Tokenizer(
        tok.tokenizer, tok.eos_token_ids, chat_template=chat_template, special_tokens=special
    )


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_parser_reads_what_the_template_writes(name: str, qwen2_tiny: Path):
    chat_template = template(name)
    parser = parser_for(chat_template)
    assert parser is PARSERS[TEMPLATES[name]]
    tok = _tokenizer(qwen2_tiny, chat_template)
    user = {"role": "user", "content": "Weather in Paris and Oslo?"}
    calls = [
        {"id": f"call{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(CALLS)
    ]
    history = template_messages(
        [ChatMessage(**user), ChatMessage(role="assistant", content="", tool_calls=calls)]
    )
    prefix = tok.apply_chat_template(history[:1], tools=TOOLS)
    full = tok.apply_chat_template(history, add_generation_prompt=False, tools=TOOLS)
    assert full.startswith(prefix) and "get_weather" in prefix  # the tools reached it
    answer = full[len(prefix) :]
    for end in TURN_ENDS:
        answer = answer.replace(end, "")
    out = ChoiceOutput(parser(TOOLS), None)
    deltas, finish = out.step(answer, True, "stop")
    got = message(deltas)
    assert finish == "tool_calls", answer
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got.tool_calls] == CALLS
    assert not got.content


@pytest.fixture(scope="module")
def llm(qwen2_tiny: Path) -> Any:
    from nanovllm_mlx import LLM

    return LLM(str(qwen2_tiny), **SMALL_KV)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_grammar_makes_a_random_model_call(name: str, llm: Any):
    from nanovllm_mlx import SamplingParams

    parser = PARSERS[name]
    grammar = parser(TOOLS).grammar([t["function"] for t in TOOLS], parallel=False)
    prompt = llm.tokenizer.encode("Call a tool:")
    params = [
        SamplingParams(grammar=grammar, temperature=1.0, seed=seed, max_tokens=120)
        for seed in range(3)
    ]
    for out in llm.generate([prompt] * 3, params):
        deltas, finish = ChoiceOutput(parser(TOOLS), None).step(out["text"], True, "stop")
        got = message(deltas)
        assert finish == "tool_calls", out["text"]
        [call] = got.tool_calls
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and set(args) == {"city", "days"}
        assert isinstance(args["city"], str) and 1 <= args["days"] <= 9, out["text"]


def test_llm_chat_returns_parsed_calls(llm: Any):
    from nanovllm_mlx import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=120)
    first = llm.chat(
        [{"role": "user", "content": "Weather?"}],
        params,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert first["finish_reason"] == "tool_calls" and first["content"] is None
    [call] = first["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert set(json.loads(call["function"]["arguments"])) == {"city", "days"}
    # The loop's next turn: the call and its result in the history, a free answer.
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
    ]
    second = llm.chat(history, SamplingParams(max_tokens=4), tools=TOOLS)
    assert second["finish_reason"] == "length" and isinstance(second["content"], str)
    assert second["tool_calls"] == []
    plain = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3))
    assert plain["content"] == plain["text"] and plain["tool_calls"] == []


def test_llm_chat_finds_a_special_token_marker(qwen2_tiny: Path, tmp_path: Path):
    from chat_templates import MISTRAL_TOOLS, with_template

    from nanovllm_mlx import LLM, SamplingParams

    model = with_template(qwen2_tiny, tmp_path / "m", MISTRAL_TOOLS, special=("[TOOL_CALLS]",))
    llm = LLM(str(model), **SMALL_KV)
    out = llm.chat(
        [{"role": "user", "content": "Weather?"}],
        SamplingParams(temperature=0.0, max_tokens=120),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert "[TOOL_CALLS]" not in out["text"]  # dropped by the detokenizer, found by id
    assert out["finish_reason"] == "tool_calls" and len(out["tool_calls"]) == 1


@pytest.mark.parametrize("opened", [True, False])
def test_tool_grammar_after_thinking(opened: bool, qwen2_tiny: Path):
    """Thinking passes unconstrained up to </think>; then only a valid call does."""
    import llguidance

    from nanovllm_mlx.serving.reasoning import after_thinking

    tok = _tokenizer(qwen2_tiny, "")
    parser = PARSERS["hermes"]
    calls = parser(TOOLS).grammar([t["function"] for t in TOOLS], parallel=False)
    grammar = after_thinking(calls, opened, {})
    lltok = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=50304)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(grammar))
        ids = tok.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
    call += "\n</tool_call>"
    thought = "Hmm </thin <b> rain?</think>\n\n"
    head = "" if opened else "<think>"
    assert accepts(head + thought + call)
    assert not accepts(head + thought + "It rains.")  # after the thinking: a call only
    assert not accepts(head + thought + call.replace("2", "12"))  # days is 1-9
    assert accepts(call) is (not opened)  # no thinking at all, unless the prompt opened it
