"""`nanovllm chat`'s view of an answer as it streams: a <think> model's thinking dimmed
and set apart, the answer after it. Only the answer goes back into the conversation, as
the thinking models' own templates drop earlier turns' thinking."""

from __future__ import annotations

from cli.ui import sanitize
from nanovllm_mlx.serving.reasoning import ThinkSplitter, prompt_opens_thinking, template_thinks
from nanovllm_mlx.serving.tools.pieces import Content, Piece, Reasoning

DIM, UNDIM = "\x1b[2m", "\x1b[22m"


class AnswerView:
    def __init__(self, template: str | None, prompt_text: str, color: bool):
        thinks = template_thinks(template)
        self.splitter = ThinkSplitter(prompt_opens_thinking(prompt_text)) if thinks else None
        self.color = color
        self.thought = False  # some thinking has been shown
        self.answer = ""

    def feed(self, text: str, final: bool = False) -> str:
        """What to write for the text that arrived (all of it when final)."""
        pieces: list[Piece] = [Content(text)]
        if self.splitter is not None:
            pieces = self.splitter.feed(text) + (self.splitter.finish() if final else [])
        shown = []
        for piece in pieces:
            if isinstance(piece, Reasoning):
                part = sanitize(piece.text if self.thought else piece.text.lstrip())
                if part:
                    shown.append(f"{DIM}{part}{UNDIM}" if self.color else part)
                    self.thought = True
            elif isinstance(piece, Content):
                part = sanitize(piece.text if self.answer else piece.text.lstrip())
                if part and self.thought and not self.answer:
                    shown.append("\n\n")  # the answer apart from the thinking
                self.answer += part
                shown.append(part)
        return "".join(shown)
