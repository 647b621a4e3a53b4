"""The engine's typed errors: each carries what a caller needs to report it well.

They subclass the built-in exception a caller would catch anyway (ValueError for bad
input), so `except ValueError` keeps working, while the server reads `param` and `code`
instead of parsing messages.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses before it is queued.

    param: the offending field as the OpenAI API names it (`top_k`, `prompt`, ...), or None
    when no single field is at fault; code: a machine-readable reason where one exists.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
        self.index: int | None = None  # which prompt of a batch (LLMEngine.add_requests)


class ContextLengthError(InvalidRequestError):
    """The prompt (plus what the request asks to generate) does not fit the context."""

    def __init__(self, message: str, param: str | None = "prompt"):
        super().__init__(message, param, "context_length_exceeded")


class EngineStalledError(RuntimeError):
    """The engine has requests it can make no progress on: a bug, reported instead of a
    silent spin."""


class TensorParallelError(RuntimeError):
    """A rank died, stopped answering or disagreed: the run cannot go on."""


class CheckpointLayoutError(ValueError):
    """A checkpoint's tensors are not in any layout the loader reads for its architecture:
    the message names the layout expected and what was found."""


class DraftModelError(ValueError):
    """A draft model (speculative='draft') that cannot propose for this target: another
    tokenizer or vocabulary, a recurrent state, a shorter context."""
