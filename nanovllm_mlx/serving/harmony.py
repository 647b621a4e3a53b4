"""gpt-oss's harmony output split into OpenAI's fields, incrementally.

A harmony answer is a run of messages, each a header then a body:
`<|channel|>analysis<|message|>...<|end|>` (the reasoning), `<|start|>assistant
<|channel|>final<|message|>...<|return|>` (the answer), and tool calls as
`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>` (the
recipient may also come before the channel). analysis becomes reasoning_content, final
and commentary without a recipient content, and a message to `functions.NAME` a call.
The markers are special tokens, which the detokenizer drops: the server puts them back
by token id (chat_output.output_text) before this splitter reads the text.
"""

from __future__ import annotations

import json
import re

from nanovllm_mlx.serving.tools.pieces import Call, Content, Piece, Reasoning, holdback

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
HARMONY_TAGS = ("<|start|>", "<|channel|>", "<|constrain|>", MESSAGE, *ENDS)
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


def template_is_harmony(template: str | None) -> bool:
    return template is not None and "<|channel|>" in template


class HarmonySplitter:
    """feed() the output text as it arrives, finish() at the end: reasoning, content and
    call pieces, each as soon as it is known (a call's at its end)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_header = True  # else inside a message body
        self._channel = "final"
        self._recipient: str | None = None
        self._arguments = ""

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while self._buffer:
            if self._in_header:
                if not self._read_header():
                    break
            else:
                ends = [(self._buffer.find(e), e) for e in ENDS if e in self._buffer]
                if not ends:
                    keep = max(holdback(self._buffer, e) for e in ENDS)
                    pieces += self._body(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                at, end = min(ends)
                pieces += self._body(self._buffer[:at]) + self._close()
                self._buffer = self._buffer[at + len(end) :]
        return pieces

    def finish(self) -> list[Piece]:
        rest, self._buffer = self._buffer, ""
        if not self._in_header:  # cut short inside a body
            return self._body(rest) + self._close()
        # A header never finished: markers alone are not the answer.
        text = rest.strip()
        return [Content(text)] if text and "<|" not in text else []

    def _read_header(self) -> bool:
        """Consume a header up to its <|message|>; False while it is incomplete (the
        buffer keeps it whole, so a marker split over feeds is still found)."""
        at = self._buffer.find(MESSAGE)
        if at < 0:
            start = self._buffer.lstrip()
            if start and not start.startswith("<|") and not "<|".startswith(start):
                # No harmony header at all: the text is the answer.
                self._in_header, self._channel, self._recipient = False, "final", None
                return True
            return False
        header = self._buffer[:at]
        self._buffer = self._buffer[at + len(MESSAGE) :]
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        self._channel = channel.group(1) if channel else "final"
        self._recipient = recipient.group(1) if recipient else None
        self._in_header, self._arguments = False, ""
        return True

    def _body(self, text: str) -> list[Piece]:
        if not text:
            return []
        if self._recipient is not None:
            self._arguments += text
            return []
        return [Reasoning(text) if self._channel == "analysis" else Content(text)]

    def _close(self) -> list[Piece]:
        """The message's end: a call is complete now."""
        pieces: list[Piece] = []
        if self._recipient is not None:
            args = self._arguments.strip()
            try:
                json.loads(args or "{}")
                pieces.append(Call(self._recipient, args or "{}"))
            except json.JSONDecodeError:
                # Not JSON (cut short, or free text to a tool): shown, not called.
                pieces.append(Content(self._arguments))
        self._in_header, self._recipient, self._arguments = True, None, ""
        return pieces
