"""Sampled tokens in, text deltas out; the one place that decides when a request ends.

A request ends on a stop token id, on EOS (unless ignore_eos), on a stop string, or when
it reaches max_tokens or the context length (Sequence.tokens_left); an abort or an
engine failure confined to it ends it from outside ("abort", "error"). The scheduler only
retires the sequences this module says are done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanovllm_mlx.engine.sequence import Sequence
from nanovllm_mlx.loading.tokenizer import Detokenizer, Tokenizer


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step: deltas, plus totals for usage reports."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[float] | None = None
    error: str | None = None  # why the engine failed this request (finish_reason "error")


def token_finish_reason(seq: Sequence, eos_token_ids: set[int], max_model_len: int) -> str | None:
    """Why seq ends after the token it just sampled, judging by token ids and length alone
    (stop strings need the text: OutputProcessor adds them)."""
    token = seq.token_ids[-1]
    if token in seq.params.stop_token_ids:
        return "stop"
    if not seq.params.ignore_eos and token in eos_token_ids:
        return "stop"
    if seq.tokens_left(max_model_len) <= 0:
        return "length"
    return None


@dataclass(slots=True)
class _RequestState:
    seq: Sequence
    detokenizer: Detokenizer
    text: str = ""  # decoded so far (cut at a stop string once one is found)
    sent: int = 0  # characters of text already returned
    max_stop_len: int = 0
    logprobs: list[float] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._states: dict[str, _RequestState] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def add(self, seq: Sequence) -> None:
        stop_len = max((len(s) for s in seq.params.stop), default=0)
        detokenizer = self.tokenizer.detokenizer(seq.token_ids)
        self._states[seq.request_id] = _RequestState(seq, detokenizer, max_stop_len=stop_len)

    def sequence(self, request_id: str) -> Sequence | None:
        state = self._states.get(request_id)
        return None if state is None else state.seq

    def pop(self, request_id: str) -> Sequence | None:
        """Forget a request (an abort); its sequence, or None if it is not known."""
        state = self._states.pop(request_id, None)
        return None if state is None else state.seq

    def process(
        self, sampled: list[Sequence], logprobs: list[float] | None
    ) -> tuple[list[RequestOutput], list[tuple[Sequence, str]]]:
        """One output per sequence that sampled a token this step (its token already
        appended), and the (sequence, finish reason) pairs that end with this token."""
        outputs, finished = [], []
        for i, seq in enumerate(sampled):
            state = self._states[seq.request_id]
            if logprobs is not None:
                state.logprobs.append(logprobs[i])
            try:
                out = self._output(state)
            except Exception as e:  # a detokenizer fault: this request's alone
                out = self.ended_output(seq, "error", f"detokenizing failed: {e!r}")
            outputs.append(out)
            if out.finished:
                del self._states[seq.request_id]
                finished.append((seq, out.finish_reason))
        return outputs, finished

    def ended_output(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        """The last output of a request ended from outside (an abort, an engine failure
        confined to it): no new text."""
        return RequestOutput(
            request_id=seq.request_id,
            text="",
            token_ids=[],
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[] if seq.params.logprobs else None,
            error=error,
        )

    def _output(self, state: _RequestState) -> RequestOutput:
        seq = state.seq
        token = seq.token_ids[-1]
        state.text += state.detokenizer.step(token)
        reason = token_finish_reason(seq, self.tokenizer.eos_token_ids, self.max_model_len)
        if hits := self._stop_string_hits(state):
            state.text = state.text[: min(hits)]
            reason = "stop"
        elif reason is not None:
            self._flush(state)
        finished = reason is not None
        end = len(state.text) if finished else len(state.text) - self._held_back(state)
        delta = state.text[state.sent : end]
        state.sent = max(state.sent, end)
        return RequestOutput(
            request_id=seq.request_id,
            text=delta,
            token_ids=[token],
            finished=finished,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=state.logprobs[-1:] if seq.params.logprobs else None,
        )

    @staticmethod
    def _stop_string_hits(state: _RequestState) -> list[int]:
        if not state.seq.params.stop:
            return []
        # A stop string may straddle tokens: search from before the unsent text.
        start = max(0, state.sent - state.max_stop_len + 1)
        return [i for s in state.seq.params.stop if (i := state.text.find(s, start)) >= 0]

    def _flush(self, state: _RequestState) -> None:
        # The streaming decoder may still hold bytes of an incomplete character.
        full = self.tokenizer.decode(state.seq.output_token_ids)
        if full.startswith(state.text):
            state.text = full

    @staticmethod
    def _held_back(state: _RequestState) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        text = state.text
        for n in range(min(state.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in state.seq.params.stop):
                return n
        return 0
