"""Speculative decoding's host side: which decoding sequences propose tokens this step,
how many (per-sequence adaptive k), and the counts behind the acceptance rate. Plain
Python; the scheduler asks, and tells it what was accepted.

A sequence whose last token is known proposes up to k tokens by prompt lookup
(engine/core/ngram.py). Its chunk in the step is then that token and the draft; the
sampler draws every position of it as it would have drawn each token in turn (the same
processors and, for a seeded request, the same per-position noise), and the scheduler
keeps the draft up to its first token that differs from the draw, plus the draw there.
For a draft that is a single proposed token per position (a point mass), keeping
token t where the draw is t is the standard rejection rule: t is kept with probability
p(t), and where it is not, the draw is distributed as p without t, renormalised. So the
output's distribution is the model's, and a seeded request's tokens are the same as
without speculation.

Not proposed for: a request whose sampling reads its own history (repetition, presence
or frequency penalties, a grammar: each draft position would need the state after the
tokens before it), a choice still holding forks, and a sequence with one token left.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm_mlx.engine.core.ngram import NgramIndex
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.core.spec_state import SpecState

# What verifying one draft token adds to a decode step, as a share of the step. On 2 CPU
# cores (SmolLM2-135M, float32, MKL on one thread, the machine shared), steps verifying 1,
# 2 and 4 always-rejected draft tokens took 15%, 21% and 62% more CPU time than a plain
# decode step (69 ms): each draft token is one more row through every matmul, and a CPU
# step is partly compute-bound. A GPU step is bound by reading the weights, where this is
# smaller. The adaptive k never proposes where the acceptance it expects does not pay.
DRAFT_COST = 0.12
RATE_WEIGHT = 0.3  # weight of the latest draft in a sequence's running acceptance rate
MAX_SKIP = 32  # most steps between probes of a sequence whose drafts do not pay
# No probing where a draft token must be accepted with more than this probability to pay
# (a wide batch): a probe there costs a row for a small chance of finding that. 32
# concurrent requests on this CPU ran at 0.77x wall (0.94x CPU time) with probes.
PROBE_BAR = 0.5


def draft_bar(sequences: int, tokens: int) -> float:
    """What a draft token must be expected to add (its acceptance probability) to pay for
    its verification, in a step of `sequences` sampling sequences and `tokens` tokens: its
    DRAFT_COST of a one-token step times the tokens a one-token step's time gets now."""
    return DRAFT_COST * sequences / (1.0 + DRAFT_COST * (tokens - 1))


def best_k(rate: float, most: int, sequences: int = 1, tokens: int = 1) -> int:
    """How many tokens a sequence whose draft tokens are each accepted with probability
    `rate` (after the one before it) should propose, in a step of `sequences` sampling
    sequences and `tokens` tokens before drafts. Draft token i adds rate**i tokens and
    DRAFT_COST of a one-token step; the step's tokens so far come at
    sequences / (1 + DRAFT_COST * (tokens - 1)) per one-token step, so a draft token pays
    where rate**i beats DRAFT_COST times that. A lone sequence needs rate**i > 0.12; in a
    step of 32 decodes, where each row costs nearly what it returns, rate**i > 0.81.
    0: proposing does not pay."""
    bar = draft_bar(sequences, tokens)
    k, gain = 0, 1.0
    while k < most:
        gain *= rate
        if gain <= bar:
            break
        k += 1
    return k


def accepted_prefix(draft: list[int], drawn: list[int]) -> int:
    """How many of the draft's tokens the draws kept: those before the first that differs
    from the token drawn at its position."""
    for i, token in enumerate(draft):
        if drawn[i] != token:
            return i
    return len(draft)


@dataclass(slots=True)
class SpecCounts:
    drafts: int = 0  # verifications: entries that carried a draft
    draft_tokens: int = 0  # tokens proposed
    accepted_tokens: int = 0  # of those, accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a verifying sequence gains a step: those accepted and the drawn one."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 0.0


class Speculator:
    def __init__(
        self, num_tokens: int, min_n: int, max_n: int, special: frozenset[int] = frozenset()
    ):
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n
        # Drafts end before a special token (EOS, a tool-call marker): such a token is only
        # ever the drawn one, last of a step's tokens, where the server's tool-call parsing
        # looks for a marker the detokenizer drops (serving/chat_output.output_text).
        self.special = special
        self.counts = SpecCounts()

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        return (
            seq.num_output_tokens > 0
            and not seq.forks
            and not seq.params.needs_history
            and seq.constraint is None
        )

    def _state(self, seq: Sequence) -> SpecState:
        if seq.spec is None:
            seq.spec = SpecState(NgramIndex(self.min_n, self.max_n))
        state: SpecState = seq.spec
        return state

    def active(self, seq: Sequence) -> bool:
        """Whether seq is likely to propose at its next step (its last lookup found a
        draft): a step launched ahead proposes nothing, so the scheduler launches ahead
        only where no sequence of the batch is."""
        return seq.spec is not None and seq.spec.matched and self.eligible(seq)

    def look(self, seq: Sequence) -> None:
        """Look up seq without proposing (its step was launched ahead as a plain decode),
        so that active() says whether the next step should be."""
        if self.eligible(seq):
            state = self._state(seq)
            state.matched = bool(state.index.propose(seq.token_ids, 1))

    def propose(self, seq: Sequence, limit: int, sequences: int = 1, tokens: int = 1) -> list[int]:
        """At most `limit` tokens to verify after seq's last one (none: a plain decode), in
        a step of `sequences` sampling sequences and `tokens` tokens (see best_k).
        Where its acceptance rate makes drafts not pay, a sequence still probes with one
        token now and then (after 1, 2, 4, ... MAX_SKIP steps), so that it speculates
        again once the text starts repeating; not in a wide batch (PROBE_BAR)."""
        if limit < 1 or not self.eligible(seq):
            return []
        state = self._state(seq)
        k = best_k(state.rate, self.num_tokens, sequences, tokens)
        if k > 0:
            draft = state.index.propose(seq.token_ids, min(k, limit))
        elif draft_bar(sequences, tokens) > PROBE_BAR:
            draft = []
        elif state.skip:
            state.skip -= 1
            draft = []
        else:
            draft = state.index.propose(seq.token_ids, 1)
            if draft:
                state.skip = min(MAX_SKIP, 2**state.probes)
                state.probes += 1
        for i, token in enumerate(draft):
            if token in self.special:
                draft = draft[:i]
                break
        state.matched = bool(draft)
        return draft

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """A draft of `proposed` tokens was verified and its first `accepted` kept."""
        self.counts.drafts += 1
        self.counts.draft_tokens += proposed
        self.counts.accepted_tokens += accepted
        state = self._state(seq)
        state.rate += RATE_WEIGHT * (accepted / proposed - state.rate)
        if accepted:
            state.probes = 0
