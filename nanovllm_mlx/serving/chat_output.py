"""One chat choice's output text as OpenAI deltas: reasoning split off, tool calls parsed.

Streamed and whole answers go through this same code: a whole answer's message is the
merge of the deltas a stream of it would send, so the two cannot disagree.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from nanovllm_mlx.engine.output_processor import RequestOutput
from nanovllm_mlx.serving.harmony import HarmonySplitter
from nanovllm_mlx.serving.protocol import AssistantMessage, Delta
from nanovllm_mlx.serving.reasoning import ThinkSplitter
from nanovllm_mlx.serving.tools.parser import ToolParser
from nanovllm_mlx.serving.tools.pieces import Content, Piece, Reasoning
from nanovllm_mlx.serving.tools.protocol import (
    FunctionCallOut,
    FunctionDelta,
    ToolCallDelta,
    ToolCallOut,
)


class ChoiceOutput:
    def __init__(self, parser: ToolParser | None, thinking: ThinkSplitter | HarmonySplitter | None):
        self.parser = parser
        self.thinking = thinking
        self.calls = 0

    def step(self, text: str, finished: bool, reason: str | None) -> tuple[list[Delta], str | None]:
        """Deltas for text that arrived; at the end, the rest, and the finish reason (a
        choice that ended in tool calls says so)."""
        pieces = self._parse(text, finished)
        deltas = [d for p in pieces for d in self._deltas(p)]
        if finished and self.calls and reason == "stop":
            reason = "tool_calls"
        return deltas, reason

    def _parse(self, text: str, finished: bool) -> list[Piece]:
        pieces = self.thinking.feed(text) if self.thinking else [Content(text)]
        if finished and self.thinking:
            pieces += self.thinking.finish()
        if self.parser is None:
            return pieces
        out: list[Piece] = []
        for p in pieces:
            out += self.parser.feed(p.text) if isinstance(p, Content) else [p]
        return out + (self.parser.finish() if finished else [])

    def _deltas(self, piece: Piece) -> list[Delta]:
        if isinstance(piece, Content):
            return [Delta(content=piece.text)] if piece.text else []
        if isinstance(piece, Reasoning):
            return [Delta(reasoning_content=piece.text)]
        index, self.calls = self.calls, self.calls + 1
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        # The id and name first, then the arguments, as OpenAI streams a call.
        head = ToolCallDelta(
            index=index,
            id=call_id,
            type="function",
            function=FunctionDelta(name=piece.name, arguments=""),
        )
        args = ToolCallDelta(index=index, function=FunctionDelta(arguments=piece.arguments))
        return [Delta(tool_calls=[head]), Delta(tool_calls=[args])]


def message(deltas: list[Delta]) -> AssistantMessage:
    """The whole answer the deltas make."""
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(d.reasoning_content or "" for d in deltas)
    calls: dict[int, ToolCallOut] = {}
    for d in deltas:
        for c in d.tool_calls or []:
            if c.index not in calls:
                assert c.id is not None and c.function.name is not None
                calls[c.index] = ToolCallOut(
                    id=c.id, function=FunctionCallOut(name=c.function.name, arguments="")
                )
            calls[c.index].function.arguments += c.function.arguments or ""
    return AssistantMessage(
        content=content if content or not calls else None,
        reasoning_content=reasoning or None,
        tool_calls=[calls[i] for i in sorted(calls)] or None,
    )


ChoiceFactory = Callable[[], ChoiceOutput]


def output_text(outputs: list[RequestOutput], markers: dict[int, str]) -> str:
    """The outputs' text with the markers a parser looks for put back where they were
    sampled: markers that are special tokens (Mistral's [TOOL_CALLS]) are found by token
    id, since the detokenizer drops special tokens. An output holds one step's tokens, so
    a marker among them is its first token or comes after the text."""
    parts = []
    for o in outputs:
        found = [markers[t] for t in o.token_ids if t in markers]
        if not found:
            parts.append(o.text)
        elif o.token_ids[0] in markers:
            parts += [*found, o.text]
        else:
            parts += [o.text, *found]
    return "".join(parts)
