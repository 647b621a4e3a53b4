"""Structured output through llguidance: a JSON schema, a regular expression or a Lark
grammar becomes a matcher per choice, which gives the tokens allowed next as a bitmask.

Why llguidance (README, "Dependencies and why", has the measurements): no dependencies
at all (xgrammar requires torch, transformers and triton), abi3 wheels for macOS arm64 and
Linux, a grammar compiled in ~2-3 ms where outlines-core builds a vocabulary index for
~1.2-1.7 s per schema, and masks in ~0.1-0.2 ms a step on this CPU (a decode step is tens
of ms). It reads the engine's `tokenizers` JSON directly, byte-level and SentencePiece
alike, and takes recursive schemas and full context-free grammars.

Masks are computed on the host between steps, for the rows that sample (the sampler
applies them per row, so constrained and free requests share a batch); a constrained row
needs its previous token before its mask, so the scheduler launches no step ahead for a
batch holding one (SamplingParams.needs_history).
"""

from __future__ import annotations

import time
from typing import Any

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from nanovllm_mlx.engine.logits_processors import masks_min_tokens, stop_ids
from nanovllm_mlx.engine.scheduler import ScheduledSeq
from nanovllm_mlx.engine.sequence import Sequence
from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.sampling_params import SamplingParams

# JSON as json.dumps writes it: ", " and ": " and no other whitespace. With flexible
# whitespace a small model can emit blanks without end (a failure vLLM's users report);
# this layout is also the one models have seen most.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def set_masks(batch: list[ScheduledSeq]) -> None:
    """Before a step: each constrained choice that samples in it gets its grammar's mask,
    and so do the choices to be forked off a row (they sample from its logits too)."""
    for item in batch:
        if not item.samples:
            continue
        for seq in [item.seq, *item.seq.forks]:
            if seq.constraint is not None:
                hold = stop_ids(seq) if masks_min_tokens(seq) else []
                seq.token_mask = seq.constraint.mask(hold)


def advance(sampled: list[Sequence]) -> None:
    """After a step: each constrained choice's grammar takes the token it sampled."""
    for seq in sampled:
        if seq.constraint is not None:
            seq.constraint.consume(seq.token_ids[-1])


class Constraint:
    """One choice's place in its grammar."""

    __slots__ = ("matcher", "outputs")

    def __init__(self, matcher: llguidance.LLMatcher, outputs: StructuredOutputs):
        self.matcher = matcher
        self.outputs = outputs

    def mask(self, hold_back: list[int]) -> np.ndarray:
        """The tokens allowed next, int32 bitmask [ceil(vocab / 32)]. hold_back: stop
        tokens that min_tokens keeps out, unless the grammar allows nothing else (then
        the grammar wins: its output is complete)."""
        start = time.perf_counter()
        bitmask = allocate_token_bitmask(1, self.outputs.vocab_size)
        fill_next_token_bitmask(self.matcher, bitmask, 0)
        row = bitmask[0]
        if hold_back:
            ids = np.asarray(hold_back, dtype=np.int64)
            held = row.view(np.uint32).copy()
            np.bitwise_and.at(held, ids // 32, ~(np.uint32(1) << (ids % 32).astype(np.uint32)))
            if held.any():
                row = held.view(np.int32)
        self.outputs.mask_seconds += time.perf_counter() - start
        self.outputs.masks += 1
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


class StructuredOutputs:
    """The engine's grammar compiler: one llguidance tokenizer, built on first use (~0.5 s
    for a 50k vocabulary), then a matcher per constrained choice."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        # The mask covers the model's rows, and the tokenizer's if it has more.
        self.vocab_size = max(vocab_size, tokenizer.tokenizer.get_vocab_size(True))
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self.masks = 0  # computed so far, and the host time they took
        self.mask_seconds = 0.0

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            self._lltokenizer = llguidance.LLTokenizer(
                self.tokenizer.tokenizer.to_str(),
                n_vocab=self.vocab_size,
                eos_token=sorted(self.tokenizer.eos_token_ids) or None,
            )
        return self._lltokenizer

    def constraints(self, params: SamplingParams, count: int) -> list[Constraint] | None:
        """A fresh Constraint for each of count choices, or None for a free request.
        Raises InvalidRequestError naming the field when the grammar does not compile
        (llguidance's message says why: unsatisfiable, unsupported keyword, ...)."""
        if not params.structured:
            return None
        name, grammar = _grammar(params)
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{name} cannot be used: {matcher.get_error()}", name)
        return [Constraint(matcher if i == 0 else matcher.deep_copy(), self) for i in range(count)]


def _grammar(params: SamplingParams) -> tuple[str, str]:
    if params.json_schema is not None:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                params.json_schema, defaults=JSON_OPTIONS
            )
        except ValueError as e:
            raise InvalidRequestError(f"json_schema cannot be used: {e}", "json_schema") from None
        return "json_schema", grammar
    if params.regex is not None:
        return "regex", llguidance.LLMatcher.grammar_from_regex(params.regex)
    assert params.grammar is not None
    return "grammar", llguidance.LLMatcher.grammar_from_lark(params.grammar)
