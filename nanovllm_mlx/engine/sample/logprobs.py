"""Log-probabilities as the sampler computes them (lazy, on the device) and as the engine
reads them back (one record per sampled row).

Logprobs are those of the raw model output, log_softmax(logits) before temperature,
penalties, logit_bias or a grammar's mask, as vLLM returns by default (its
`logprobs_mode="raw_logprobs"`) and as OpenAI documents them: they say what the model
thinks of a token, whatever the request then did to pick it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import mlx.core as mx


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def top_n(logprobs: mx.array, n: int) -> tuple[mx.array, mx.array]:
    """The n most likely token ids of each row and their logprobs, most likely first.
    Partition, then sort only the n survivors: a full argsort of the vocabulary costs
    ~5 ms a row on CPU."""
    ids = mx.argpartition(-logprobs, n - 1, axis=-1)[:, :n]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


@dataclass(slots=True)
class RowSample:
    """What one sampled row read back besides its token."""

    logprob: float | None = None  # the sampled token's
    top: dict[int, float] | None = None  # the top-N, most likely first
    # Choices forked off this row: (first token, its record), choice 1 first.
    forks: list[tuple[int, RowSample]] = field(default_factory=list)


class SampleExtras(NamedTuple):
    """A step's lazy extras beyond the tokens: a tuple of arrays, so that mx.async_eval
    takes it as it takes an array, and `tolist()` reads it back as an array's would, one
    RowSample per sampled row (the model runner only does those two things with it).

    Rows [0, num_rows) are the step's sampling rows; the rows after them are the choices
    forked off those rows, in `forks` order ((row, count) pairs).
    """

    tokens: mx.array  # [rows + forked] every drawn token
    chosen: mx.array | None  # [rows + forked] their logprobs
    top_ids: mx.array | None  # [rows + forked, N]
    top_values: mx.array | None
    num_top: list[int]  # N each row asked for (0: none)
    want_logprobs: list[bool]
    num_rows: int
    forks: list[tuple[int, int]]

    def tolist(self) -> list[RowSample]:
        tokens = cast(list[int], self.tokens.tolist())
        chosen = _read(self.chosen)
        top_ids, top_values = _read(self.top_ids), _read(self.top_values)
        records = []
        for r in range(len(tokens)):
            rec = RowSample()
            if chosen is not None and self.want_logprobs[r]:
                rec.logprob = chosen[r]
            if top_ids is not None and self.num_top[r]:
                k = self.num_top[r]
                rec.top = dict(zip(top_ids[r][:k], top_values[r][:k]))
            records.append(rec)
        extra = self.num_rows
        for row, count in self.forks:
            for j in range(extra, extra + count):
                records[row].forks.append((tokens[j], records[j]))
            extra += count
        return records[: self.num_rows]


def _read(array: mx.array | None) -> Any:
    return None if array is None else array.tolist()
