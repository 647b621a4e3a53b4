"""What a request asks of the sampler, validated where it is made: every error names the
parameter (InvalidRequestError.param), as the OpenAI API spells it where it has one."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from nanovllm_mlx.errors import InvalidRequestError

# Integers a request may carry: a 64-bit seed (signed or unsigned, as OpenAI clients send
# them), and counts far below anything that would overflow a C int downstream.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_COUNT = 2**31 - 1
MAX_N = 128  # OpenAI's limit on n (and on best_of)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs, vLLM's default max_logprobs
LOGIT_BIAS_LIMIT = 100.0  # biases are clamped to [-100, 100], as OpenAI and vLLM do
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty, as OpenAI's


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


def _logit_bias(value: object) -> dict[int, float]:
    if not isinstance(value, dict):
        raise _bad("logit_bias", f"must be a mapping of token id to bias, got {value!r}")
    bias: dict[int, float] = {}
    for token, b in value.items():
        token_id = _count("logit_bias", token, 0)
        limit = LOGIT_BIAS_LIMIT
        bias[token_id] = min(limit, max(-limit, float(_number("logit_bias", b))))
    return bias


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # as transformers': over prompt and output tokens
    presence_penalty: float = 0.0  # as OpenAI's: over output tokens only
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = 64  # None: the rest of the context (LLMEngine resolves it)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many are out
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # n choices per request, forked after one prefill; choice i samples as a request of
    # its own with seed + i would. best_of > n: the n of best_of with the highest mean
    # token logprob, returned once all have finished.
    n: int = 1
    best_of: int | None = None
    logprobs: bool = False  # the sampled token's logprob
    top_logprobs: int = 0  # that many most likely tokens too (implies logprobs)
    prompt_logprobs: int | None = None  # each prompt token's logprob (+ top N): echo
    # Structured output, at most one: a JSON schema (dict or JSON text; {"type":
    # "object"} is OpenAI's json_object), a regular expression, or a Lark grammar as
    # llguidance reads it.
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = float(_number(name, getattr(self, name)))
            if not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
                raise _bad(
                    name, f"must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]}], got {value}"
                )
            setattr(self, name, value)
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.max_tokens is not None:
            self.max_tokens = _count("max_tokens", self.max_tokens, 1)
        self.min_tokens = _count("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad(
                "min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
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
        self._check_choices()
        self._check_logprobs()
        self._check_structured()

    def _check_choices(self) -> None:
        self.n = _count("n", self.n, 1, MAX_N)
        if self.best_of is not None:
            self.best_of = _count("best_of", self.best_of, 1, MAX_N)
            if self.best_of < self.n:
                raise _bad("best_of", f"({self.best_of}) must be >= n ({self.n})")

    def _check_logprobs(self) -> None:
        if not isinstance(self.logprobs, bool):
            raise _bad("logprobs", f"must be true or false, got {self.logprobs!r}")
        self.top_logprobs = _count("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        self.logprobs = self.logprobs or self.top_logprobs > 0
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _count(
                "prompt_logprobs", self.prompt_logprobs, 0, MAX_TOP_LOGPROBS
            )

    def _check_structured(self) -> None:
        given = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidRequestError(
                f"give at most one of json_schema, regex and grammar, got {given}", given[1]
            )
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except ValueError as e:
                raise _bad("json_schema", f"is not valid JSON: {e}") from None
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise _bad(
                "json_schema", f"must be a JSON object, got {type(self.json_schema).__name__}"
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(name, f"must be a non-empty string, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_sequences(self) -> int:
        """Sequences the request runs: best_of if given, else n."""
        return self.best_of or self.n

    @property
    def structured(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens sampled so far (so a step cannot be launched
        before the previous step's token is known)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.structured
        )
