"""Sampled tokens in, text deltas out; the one place that decides when a choice ends.

A choice ends on a stop token id, on EOS (unless ignore_eos), on a stop string, when its
grammar is complete, or when it reaches max_tokens or the context length
(Sequence.tokens_left); an abort or an engine failure ends a whole request from outside
("abort", "error"). The scheduler only retires the sequences this module says are done.

Outputs are per choice (RequestOutput.index); the last output of a request has
request_finished set. A best_of request's choices are held back until all have finished,
then the n with the highest mean token logprob are given out, indexed by rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.sample.logprobs import RowSample
from nanovllm_mlx.loading.tokenizer import Detokenizer, Tokenizer


@dataclass(slots=True)
class RequestOutput:
    """What one choice of a request produced in one step: deltas, plus totals for usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool  # this choice has ended (finish_reason says why)
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int  # this choice's
    num_cached_tokens: int
    logprobs: list[float] | None = None  # of token_ids (raw model logprobs)
    error: str | None = None  # why the engine failed this request (finish_reason "error")
    index: int = 0  # the choice
    request_finished: bool = False  # the request's last output: every choice has ended
    top_logprobs: list[dict[int, float]] | None = None  # per token, most likely first
    # On a choice's first output when the request asked for prompt logprobs: one entry per
    # prompt token (None for the first), the token's own logprob and the top-N.
    prompt_logprobs: list[dict[int, float] | None] | None = None


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """One choice's outputs, in order, as one: deltas joined, totals from the last."""
    first, last = outputs[0], outputs[-1]

    def joined(name: str) -> list[Any] | None:
        parts = [getattr(o, name) for o in outputs]
        return None if all(p is None for p in parts) else [x for p in parts if p for x in p]

    return replace(
        last,
        text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        logprobs=joined("logprobs"),
        top_logprobs=joined("top_logprobs"),
        prompt_logprobs=first.prompt_logprobs,
    )


def token_finish_reason(seq: Sequence, eos_token_ids: set[int], max_model_len: int) -> str | None:
    """Why seq ends after the token it just sampled, judging by token ids, its grammar and
    length alone (stop strings need the text: OutputProcessor adds them)."""
    token = seq.token_ids[-1]
    if token in seq.params.stop_token_ids:
        return "stop"
    if not seq.params.ignore_eos and token in eos_token_ids:
        return "stop"
    if seq.constraint is not None and seq.constraint.done:
        return "stop"
    if seq.tokens_left(max_model_len) <= 0:
        return "length"
    return None


class _GrammarFault(RuntimeError):
    pass


@dataclass(slots=True)
class _Choice:
    seq: Sequence
    detokenizer: Detokenizer
    text: str = ""  # decoded so far (cut at a stop string once one is found)
    sent: int = 0  # characters of text already returned
    max_stop_len: int = 0
    logprob_sum: float = 0.0  # for best_of's ranking
    started: bool = False  # its first output has gone out
    held: list[RequestOutput] = field(default_factory=list)  # best_of: not given out yet


@dataclass(slots=True)
class _Request:
    choices: dict[int, _Choice]
    ranked: bool  # best_of > n: hold every output until all choices have ended
    n: int
    done: list[_Choice] = field(default_factory=list)  # ranked: choices that have ended


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._requests: dict[str, _Request] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, seqs: list[Sequence]) -> None:
        """A request's choices (choice 0 first)."""
        params = seqs[0].params
        stop_len = max((len(s) for s in params.stop), default=0)
        choices = {
            seq.index: _Choice(
                seq, self.tokenizer.detokenizer(seq.token_ids), max_stop_len=stop_len
            )
            for seq in seqs
        }
        ranked = params.num_sequences > params.n
        self._requests[seqs[0].request_id] = _Request(choices, ranked, params.n)

    def sequence(self, request_id: str) -> Sequence | None:
        """The request's first unfinished choice, None once it has finished."""
        request = self._requests.get(request_id)
        return None if request is None else next(iter(request.choices.values())).seq

    def end(
        self, request_id: str, reason: str, error: str | None = None
    ) -> tuple[list[Sequence], list[RequestOutput]]:
        """End a request from outside (an abort, an engine failure): its unfinished
        sequences, for the scheduler to retire, and one last output per choice the caller
        has not seen end, no new text. ([], []) if the request is not known."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return [], []
        seqs = [c.seq for c in request.choices.values()]
        if request.ranked:  # nothing was given out yet: every rank ends
            outputs = [self._ended(seqs[0], reason, error, rank) for rank in range(request.n)]
        else:
            outputs = [self._ended(seq, reason, error) for seq in seqs]
        outputs[-1].request_finished = True
        return seqs, outputs

    def process(
        self,
        sampled: list[Sequence],
        samples: list[RowSample | None] | None,
        counts: list[int] | None = None,
    ) -> tuple[list[RequestOutput], list[tuple[Sequence, str]]]:
        """One output per sequence that sampled this step (its counts[i] new tokens, one
        each when counts is None, already appended; samples: what the sampler read back
        for each new token, in order), and the (sequence, finish reason) pairs that end
        with them. A sequence that ends at one of several new tokens (a stop inside an
        accepted draft) loses the tokens after it."""
        outputs: list[RequestOutput] = []
        finished: list[tuple[Sequence, str]] = []
        at = 0
        for i, seq in enumerate(sampled):
            count = counts[i] if counts else 1
            records: list[RowSample | None] = (
                samples[at : at + count] if samples else [None] * count
            )
            at += count
            request = self._requests.get(seq.request_id)
            if request is None:  # ended by a fault of another choice this step
                continue
            choice = request.choices[seq.index]
            try:
                out = self._output(choice, records)
            except Exception as e:  # a detokenizer or grammar fault: this request's alone
                message = str(e) if isinstance(e, _GrammarFault) else f"detokenizing failed: {e!r}"
                seqs, ended = self.end(seq.request_id, "error", message)
                outputs += ended
                finished += [(s, "error") for s in seqs]
                continue
            if out.finished:
                del request.choices[seq.index]
                finished.append((seq, out.finish_reason or "stop"))
            outputs += self._give_out(seq.request_id, request, choice, out)
        return outputs, finished

    def _give_out(
        self, request_id: str, request: _Request, choice: _Choice, out: RequestOutput
    ) -> list[RequestOutput]:
        if not request.ranked:
            if not request.choices:
                out.request_finished = True
                del self._requests[request_id]
            return [out]
        choice.held.append(out)
        if out.finished:
            request.done.append(choice)
        if request.choices:
            return []
        del self._requests[request_id]
        # OpenAI's best_of: "the one with the highest log probability per token".
        request.done.sort(key=lambda c: -c.logprob_sum / max(1, len(c.seq.output_token_ids)))
        given = []
        for rank, best in enumerate(request.done[: request.n]):
            merged = merge_outputs(best.held)
            if not best.seq.params.logprobs:
                merged.logprobs = None
            given.append(replace(merged, index=rank))
        given[-1].request_finished = True
        return given

    def _ended(
        self, seq: Sequence, reason: str, error: str | None, rank: int | None = None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            text="",
            token_ids=[],
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens if rank is None else 0,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[] if seq.params.logprobs else None,
            error=error,
            index=seq.index if rank is None else rank,
        )

    def _output(self, choice: _Choice, records: list[RowSample | None]) -> RequestOutput:
        """The choice's output for its len(records) new tokens, judged one at a time as
        if each had come in its own step: the first that ends the choice is its last."""
        seq = choice.seq
        cut = len(seq.token_ids) - len(records)
        new = seq.token_ids[cut:]
        del seq.token_ids[cut:]
        reason = None
        for token in new:
            seq.token_ids.append(token)
            choice.text += choice.detokenizer.step(token)
            if seq.constraint is not None and seq.constraint.error:
                raise _GrammarFault(f"structured output failed: {seq.constraint.error}")
            reason = token_finish_reason(seq, self.tokenizer.eos_token_ids, self.max_model_len)
            if hits := self._stop_string_hits(choice):
                choice.text = choice.text[: min(hits)]
                reason = "stop"
                break
            if reason is not None:
                self._flush(choice)
                break
        kept = len(seq.token_ids) - cut
        records = records[:kept]
        finished = reason is not None
        end = len(choice.text) if finished else len(choice.text) - self._held_back(choice)
        delta = choice.text[choice.sent : end]
        choice.sent = max(choice.sent, end)
        logprobs = [r.logprob if r is not None else None for r in records]
        choice.logprob_sum += sum(lp or 0.0 for lp in logprobs)
        params = seq.params
        out = RequestOutput(
            request_id=seq.request_id,
            text=delta,
            token_ids=seq.token_ids[cut:],
            finished=finished,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[float("nan") if lp is None else lp for lp in logprobs]
            if params.logprobs
            else None,
            index=seq.index,
            top_logprobs=[(r.top or {}) if r else {} for r in records]
            if params.top_logprobs
            else None,
            prompt_logprobs=None if choice.started else seq.prompt_logprobs,
        )
        choice.started = True
        return out

    @staticmethod
    def _stop_string_hits(choice: _Choice) -> list[int]:
        stop = choice.seq.params.stop
        if not stop:
            return []
        # A stop string may straddle tokens: search from before the unsent text.
        start = max(0, choice.sent - choice.max_stop_len + 1)
        return [i for s in stop if (i := choice.text.find(s, start)) >= 0]

    def _flush(self, choice: _Choice) -> None:
        # The streaming decoder may still hold bytes of an incomplete character.
        full = self.tokenizer.decode(choice.seq.output_token_ids)
        if full.startswith(choice.text):
            choice.text = full

    @staticmethod
    def _held_back(choice: _Choice) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        text = choice.text
        stop = choice.seq.params.stop
        for n in range(min(choice.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in stop):
                return n
        return 0
