"""One constrained choice's place in its grammar (llguidance's matcher), and the count of
masks its engine computed. Apart from the grammar compiler (engine/sample/structured.py) so that
a Sequence can hold one without importing the compiler."""

from __future__ import annotations

import time
from dataclasses import dataclass

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask


@dataclass(slots=True)
class MaskCounter:
    """The masks an engine's constraints computed, and the host time they took."""

    vocab_size: int  # a mask's width: the model's rows, or the tokenizer's if more
    masks: int = 0
    seconds: float = 0.0


class Constraint:
    """One choice's place in its grammar."""

    __slots__ = ("matcher", "counter")

    def __init__(self, matcher: llguidance.LLMatcher, counter: MaskCounter):
        self.matcher = matcher
        self.counter = counter

    def mask(self, hold_back: list[int]) -> np.ndarray:
        """The tokens allowed next, int32 bitmask [ceil(vocab / 32)]. hold_back: stop
        tokens that min_tokens keeps out, unless the grammar allows nothing else (then
        the grammar wins: its output is complete)."""
        start = time.perf_counter()
        bitmask = allocate_token_bitmask(1, self.counter.vocab_size)
        fill_next_token_bitmask(self.matcher, bitmask, 0)
        row: np.ndarray = bitmask[0]
        if hold_back:
            ids = np.asarray(hold_back, dtype=np.int64)
            held = row.view(np.uint32).copy()
            np.bitwise_and.at(held, ids // 32, ~(np.uint32(1) << (ids % 32).astype(np.uint32)))
            if held.any():
                row = held.view(np.int32)
        self.counter.seconds += time.perf_counter() - start
        self.counter.masks += 1
        return row

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error() or "the grammar's matcher failed"
