"""`<think>` blocks (Qwen3, DeepSeek-R1 style) split from the answer, incrementally: the
thinking becomes reasoning_content, the rest content. A prompt that already opened the
block (templates that write `<think>` into the generation prompt) starts in reasoning."""

from __future__ import annotations

from nanovllm_mlx.serving.tools.pieces import Content, Piece, Reasoning, holdback

OPEN, CLOSE = "<think>", "</think>"
THINK_TAGS = (OPEN, CLOSE)


def template_thinks(template: str | None) -> bool:
    return template is not None and CLOSE in template


def prompt_opens_thinking(prompt_text: str) -> bool:
    """The generation prompt ends inside a think block the template opened."""
    tail = prompt_text.rstrip()
    return tail.rfind(OPEN) > tail.rfind(CLOSE)


# Text up to and including the first </think>, as a regular expression (no lookahead in
# llguidance's lexer): any character but "<", or a "<" that does not go on to "</think>"
# (after any run of partial matches, each cut short by a new "<"), then "</think>".
_PARTIAL = "(/(t(h(i(n(k)?)?)?)?)?)?"
_MISS = "([^/<]|/([^t<]|t([^h<]|h([^i<]|i([^n<]|n([^k<]|k[^><]))))))"
THOUGHT = f"([^<]|<({_PARTIAL}<)*{_MISS})*<({_PARTIAL}<)*/think>"


def after_thinking(grammar: str, opened: bool, specials: dict[str, int]) -> str | None:
    """A Lark grammar that lets a think block through before `grammar`'s output: the
    block the prompt opened (opened), else one the model may open. None when the tags
    are special tokens, which a text lexeme cannot match."""
    if OPEN in specials or CLOSE in specials:
        return None
    thought = "THOUGHT /[ \\n]*/"
    prefix = thought if opened else f'("<think>" {thought})?'
    lexeme = THOUGHT.replace("/", "\\/")
    body = grammar.replace("start:", "answer:", 1)
    return f"start: {prefix} answer\nTHOUGHT: /{lexeme}/\n{body}"


class ThinkSplitter:
    def __init__(self, in_reasoning: bool):
        self._state = "reasoning" if in_reasoning else "opening"
        self._buffer = ""

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        if self._state == "opening":
            head = self._buffer.lstrip()
            if head.startswith(OPEN):
                self._buffer, self._state = head[len(OPEN) :], "reasoning"
            elif OPEN.startswith(head):
                return pieces  # blanks, or the opening tag begun: wait
            else:
                self._state = "answer"
        if self._state == "reasoning":
            at = self._buffer.find(CLOSE)
            if at < 0:
                keep = holdback(self._buffer, CLOSE)
                pieces += _reasoning(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return pieces
            pieces += _reasoning(self._buffer[:at])
            self._buffer, self._state = self._buffer[at + len(CLOSE) :], "after"
        if self._state == "after":
            # The blank lines after </think> separate, they are not the answer's.
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return pieces
            self._state = "answer"
        if self._buffer:
            pieces.append(Content(self._buffer))
        self._buffer = ""
        return pieces

    def finish(self) -> list[Piece]:
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning":  # never closed: the output was cut short
            return _reasoning(rest)
        return [Content(rest)] if rest and self._state != "after" else []


def _reasoning(text: str) -> list[Piece]:
    return [Reasoning(text)] if text else []
