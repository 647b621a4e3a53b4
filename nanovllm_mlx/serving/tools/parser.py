"""The incremental parser every tool-call format shares: text outside calls streams out as
content, a call is held from its start marker until it is complete and then decoded by
the format; what does not decode (invalid JSON, a call never closed) ends as content.

Calls are emitted whole rather than as argument fragments guessed from a half-written
JSON: a call that turns out malformed can then still become content, and a stream never
shows a call the whole response would not have (the failure users of other servers report).
"""

from __future__ import annotations

import json
from typing import Any

from nanovllm_mlx.serving.tools.pieces import Call, Content, Piece, holdback


class ToolParser:
    """One choice's output. Subclasses set the markers and decode a call's body.

    start: the text that opens a call. end: the text that closes one, or None when a call
    (or a list of them) runs to the end of the output. at_start_only: calls are recognised
    only at the beginning of the output (formats whose marker is plain JSON)."""

    name = ""
    start = ""
    end: str | None = None
    at_start_only = False
    # Text in the chat template that says it writes this format.
    template_hints: tuple[str, ...] = ()

    def __init__(
        self, tools: list[dict[str, Any]] | None = None, specials: dict[str, int] | None = None
    ) -> None:
        # The request's functions ({"name", "parameters"}): formats that write arguments
        # as text (Qwen3-Coder's XML) read their types from the schemas.
        self.functions = {t["function"]["name"]: t["function"] for t in tools or []}
        # Markers that are special tokens, by id: the grammar must write the token the
        # model was trained on, not the same text spelt in ordinary tokens.
        self.specials = specials or {}
        self._buffer = ""  # text not yet emitted
        self._in_call = False
        self._blanks = ""
        self._seen_text = False  # at_start_only: anything but blanks emitted already
        self.calls = 0
        self.malformed = False

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while True:
            if self._in_call:
                if self.end is None or self.end not in self._buffer:
                    return pieces
                body, self._buffer = self._buffer.split(self.end, 1)
                pieces += self._close(body, self._blanks + self.start + body + self.end)
                continue
            at = self._find_start()
            if at < 0:
                keep = self._holdback()
                pieces += self._content(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return pieces
            before = self._buffer[:at]
            # The blanks before a call go with it: shown again if it proves malformed.
            self._blanks = before[len(before.rstrip()) :]
            pieces += self._content(before, before_call=True)
            self._buffer = self._buffer[at + len(self.start) :]
            self._in_call = True

    def finish(self) -> list[Piece]:
        """The output has ended: an open call either decodes (formats without an end
        marker) or is malformed and becomes content."""
        rest, self._buffer = self._buffer, ""
        if not self._in_call:
            return self._content(rest)
        self._in_call = False
        if self.end is None:
            return self._close(rest, self._blanks + self.start + rest)
        self.malformed = True
        return self._content(self._blanks + self.start + rest)

    # The format's part ----------------------------------------------------------------

    def decode(self, body: str) -> list[Call] | None:
        """The calls in one call's body, or None when it is malformed."""
        raise NotImplementedError

    def grammar(self, functions: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) for output that is only calls of these
        functions ({"name", "parameters"}), with arguments valid for their schemas."""
        raise NotImplementedError

    def lark_marker(self, text: str) -> str:
        """A marker in a grammar: its special token when it is one, else its text."""
        if text in self.specials:
            return f"<[{self.specials[text]}]>"
        return lark_literal(text)

    # Internals --------------------------------------------------------------------------

    def _find_start(self) -> int:
        if not self.at_start_only:
            return self._buffer.find(self.start)
        if self._seen_text or self.calls:
            return -1
        blanks = len(self._buffer) - len(self._buffer.lstrip())
        return blanks if self._buffer.startswith(self.start, blanks) else -1

    def _holdback(self) -> int:
        """Characters that wait for more text: a possible start of the marker, and the
        blanks before it (blanks just before a call are layout, dropped with it)."""
        if self.at_start_only and (self._seen_text or self.calls):
            return 0
        if self.at_start_only:
            head = self._buffer.lstrip()
            keep = len(self._buffer) if self.start.startswith(head) else 0
        else:
            keep = holdback(self._buffer, self.start)
        body = self._buffer[: len(self._buffer) - keep]
        return keep + len(body) - len(body.rstrip())

    def _content(self, text: str, before_call: bool = False) -> list[Piece]:
        if before_call:
            text = text.rstrip()
        if not text or (self.calls and not text.strip()):
            return []  # blank lines between and after calls are layout, not an answer
        self._seen_text = self._seen_text or bool(text.strip())
        return [Content(text)]

    def _close(self, body: str, raw: str) -> list[Piece]:
        self._in_call = False
        self._blanks = ""
        calls = self.decode(body)
        if calls is None:
            self.malformed = True
            return self._content(raw)
        self.calls += len(calls)
        return list(calls)


def json_call(obj: Any, arguments_key: str = "arguments") -> Call | None:
    """{"name": str, "arguments": {...}} (the arguments may come as a JSON string) as a
    Call with the arguments written as json.dumps does, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):  # deep nesting: not a call either
            return None
    if not isinstance(args, dict):
        return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # deep nesting: not a call either
        return None


def call_schema(
    functions: list[dict[str, Any]], arguments_key: str = "arguments"
) -> dict[str, Any]:
    """The JSON schema of one call of any of functions: {"name": ..., arguments_key: ...}."""
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                arguments_key: f.get("parameters") or {"type": "object"},
            },
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def lark_json(schema: dict[str, Any]) -> str:
    """A %json rule body in the compact layout structured outputs use (JSON_OPTIONS)."""
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return "%json " + json.dumps({**schema, "x-guidance": options})


def lark_literal(text: str) -> str:
    return json.dumps(text)
