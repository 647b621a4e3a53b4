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

from typing import TYPE_CHECKING

import llguidance

from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.sample.constraint import Constraint, MaskCounter
from nanovllm_mlx.engine.sample.logits_processors import masks_min_tokens, stop_ids
from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON as json.dumps writes it: ", " and ": " and no other whitespace. With flexible
# whitespace a small model can emit blanks without end (a failure vLLM's users report);
# this layout is also the one models have seen most.
JSON_OPTIONS: JsonCompileOptions = {
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


class StructuredOutputs:
    """The engine's grammar compiler: one llguidance tokenizer, built on first use (~0.5 s
    for a 50k vocabulary), then a matcher per constrained choice."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        # The mask covers the model's rows, and the tokenizer's if it has more.
        self.vocab_size = max(vocab_size, tokenizer.tokenizer.get_vocab_size(True))
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self.counter = MaskCounter(self.vocab_size)

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
        copies = [matcher] + [matcher.deep_copy() for _ in range(count - 1)]
        return [Constraint(m, self.counter) for m in copies]


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
