from __future__ import annotations

import math
from dataclasses import dataclass, field

from nanovllm_mlx.errors import InvalidRequestError

# Integers a request may carry: a 64-bit seed (signed or unsigned, as OpenAI clients send
# them), and counts far below anything that would overflow a C int downstream.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_COUNT = 2**31 - 1


def _bad(name: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{name} {message}", name)


def _number(name: str, value: object, *, integer: bool = False) -> float:
    # bool is an int subclass; "temperature=True" is a caller bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(name, f"must be finite, got {value!r}")
    if integer and isinstance(value, float) and not value.is_integer():
        raise _bad(name, f"must be an integer, got {value!r}")
    return value


def _count(name: str, value: object, low: int, high: int = MAX_COUNT) -> int:
    """An integer in [low, high]; a huge int is a clear error, not an OverflowError."""
    n = _number(name, value, integer=True)
    if not low <= n <= high:
        raise _bad(name, f"must be in [{low}, {high}], got {_short(n)}")
    return int(n)


def _short(n: float) -> str:
    text = str(n)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if _number("temperature", self.temperature) < 0:
            raise _bad("temperature", f"must be >= 0, got {self.temperature}")
        self.top_k = _count("top_k", self.top_k, 0)  # 0 disables it
        if not 0 < _number("top_p", self.top_p) <= 1:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= _number("min_p", self.min_p) <= 1:
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if _number("repetition_penalty", self.repetition_penalty) <= 0:
            raise _bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        self.max_tokens = _count("max_tokens", self.max_tokens, 1)
        if self.seed is not None:
            self.seed = _count("seed", self.seed, *SEED_RANGE)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise _bad("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise _bad("stop_token_ids", f"must be a list of ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = [_count("stop_token_ids", t, 0) for t in self.stop_token_ids]
        self.temperature = float(self.temperature)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
