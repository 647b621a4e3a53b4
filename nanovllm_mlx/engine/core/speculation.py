"""Speculative decoding's host side: which decoding sequences propose tokens this step,
how many (per-sequence adaptive k), and the counts behind the acceptance rate. Plain
Python; the scheduler asks, and tells it what was accepted.

A sequence whose last token is known proposes up to k tokens by prompt lookup
(engine/core/ngram.py), or a draft model's greedy tokens (a Drafter: one batched draft
forward per draft position for all the sequences that ask, engine/runner/draft_runner.py).
Its chunk in the step is then that token and the draft; the
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
from typing import Protocol

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


def draft_bar(sequences: int, tokens: int, cost: float = DRAFT_COST) -> float:
    """What a draft token must be expected to add (its acceptance probability) to pay for
    its verification, in a step of `sequences` sampling sequences and `tokens` tokens: its
    `cost` (DRAFT_COST of a one-token step, plus a draft forward for a draft model) times
    the tokens a one-token step's time gets now."""
    return cost * sequences / (1.0 + DRAFT_COST * (tokens - 1))


def best_k(
    rate: float, most: int, sequences: int = 1, tokens: int = 1, cost: float = DRAFT_COST
) -> int:
    """How many tokens a sequence whose draft tokens are each accepted with probability
    `rate` (after the one before it) should propose, in a step of `sequences` sampling
    sequences and `tokens` tokens before drafts. Draft token i adds rate**i tokens and
    DRAFT_COST of a one-token step; the step's tokens so far come at
    sequences / (1 + DRAFT_COST * (tokens - 1)) per one-token step, so a draft token pays
    where rate**i beats DRAFT_COST times that. A lone sequence needs rate**i > 0.12; in a
    step of 32 decodes, where each row costs nearly what it returns, rate**i > 0.81.
    0: proposing does not pay."""
    bar = draft_bar(sequences, tokens, cost)
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


class Drafter(Protocol):
    """A draft model's side of speculation (engine/runner/draft_runner.py)."""

    def propose(self, asks: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k greedy tokens after each (sequence, k), in one batched pass per draft
        position; fewer where its catch-up on the sequence is not done (it then sets
        SpecState.drafted to what its pool holds, past the sequence's end included)."""
        ...


class Speculator:
    def __init__(
        self,
        num_tokens: int,
        min_n: int,
        max_n: int,
        special: frozenset[int] = frozenset(),
        drafter: Drafter | None = None,
        draft_cost: float = 0.0,
    ):
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n
        # Drafts end before a special token (EOS, a tool-call marker): such a token is only
        # ever the drawn one, last of a step's tokens, where the server's tool-call parsing
        # looks for a marker the detokenizer drops (serving/chat_output.output_text).
        self.special = special
        # None: prompt lookup. A draft model's proposals cost a draft forward a token
        # besides their verification: draft_cost, as a share of a one-token target step.
        self.drafter = drafter
        self.cost = DRAFT_COST + draft_cost
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
            index = NgramIndex(self.min_n, self.max_n) if self.drafter is None else None
            seq.spec = SpecState(index)
        state: SpecState = seq.spec
        return state

    def active(self, seq: Sequence) -> bool:
        """Whether seq is likely to propose at its next step (its last lookup found a
        draft): a step launched ahead proposes nothing, so the scheduler launches ahead
        only where no sequence of the batch is."""
        return seq.spec is not None and seq.spec.matched and self.eligible(seq)

    def look(self, seq: Sequence) -> None:
        """Look up seq without proposing (its step was launched ahead as a plain decode),
        so that active() says whether the next step should be. A draft model always has
        a proposal: whether its rate makes one pay alone stands for the lookup."""
        if self.eligible(seq):
            state = self._state(seq)
            if state.index is None:
                state.matched = best_k(state.rate, self.num_tokens, cost=self.cost) > 0
            else:
                state.matched = bool(state.index.propose(seq.token_ids, 1))

    def _plan(self, state: SpecState, limit: int, sequences: int, tokens: int) -> tuple[int, bool]:
        """How many tokens to propose (see best_k), and whether that is a probe. Where its
        acceptance rate makes drafts not pay, a sequence still probes with one token now
        and then (after 1, 2, 4, ... MAX_SKIP steps), so that it speculates again once the
        text starts repeating; not in a wide batch (PROBE_BAR)."""
        k = best_k(state.rate, self.num_tokens, sequences, tokens, self.cost)
        if k > 0:
            return min(k, limit), False
        if draft_bar(sequences, tokens, self.cost) > PROBE_BAR:
            return 0, False
        if state.skip:
            state.skip -= 1
            return 0, False
        return 1, True

    @staticmethod
    def _probed(state: SpecState) -> None:
        state.skip = min(MAX_SKIP, 2**state.probes)
        state.probes += 1

    def _clip(self, draft: list[int]) -> list[int]:
        for i, token in enumerate(draft):
            if token in self.special:
                return draft[:i]
        return draft

    def propose(self, seq: Sequence, limit: int, sequences: int = 1, tokens: int = 1) -> list[int]:
        """Prompt lookup: at most `limit` tokens to verify after seq's last one (none: a
        plain decode), in a step of `sequences` sampling sequences and `tokens` tokens
        (see best_k, _plan)."""
        if limit < 1 or not self.eligible(seq):
            return []
        state = self._state(seq)
        assert state.index is not None, "a draft model proposes through wanted and draft"
        k, probe = self._plan(state, limit, sequences, tokens)
        draft = state.index.propose(seq.token_ids, k)
        if probe and draft:
            self._probed(state)
        draft = self._clip(draft)
        state.matched = bool(draft)
        return draft

    def wanted(self, seq: Sequence, limit: int, sequences: int = 1, tokens: int = 1) -> int:
        """A draft model: how many tokens to ask it for after seq's last one (at most
        `limit`; see _plan). The tokens come from draft(), batched over the step."""
        if limit < 1 or not self.eligible(seq):
            return 0
        state = self._state(seq)
        k, probe = self._plan(state, limit, sequences, tokens)
        if probe:
            self._probed(state)
        return k

    def draft(self, asks: list[tuple[Sequence, int]]) -> list[list[int]]:
        """The draft model's tokens for each (sequence, k) that wanted() gave."""
        assert self.drafter is not None
        drafts = []
        for (seq, k), draft in zip(asks, self.drafter.propose(asks)):
            draft = self._clip(draft[:k])
            state = self._state(seq)
            # Its pool holds the draft tokens it fed, past the sequence's end: those
            # before a clipped token's position can still be accepted (record).
            state.drafted = min(state.drafted, seq.num_tokens + len(draft))
            state.matched = bool(draft)
            drafts.append(draft)
        return drafts

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """A draft of `proposed` tokens was verified and its first `accepted` kept (seq's
        tokens now end with them and the token drawn after them)."""
        self.counts.drafts += 1
        self.counts.draft_tokens += proposed
        self.counts.accepted_tokens += accepted
        state = self._state(seq)
        state.rate += RATE_WEIGHT * (accepted / proposed - state.rate)
        if accepted:
            state.probes = 0
        # A draft model's K/V of the rejected tail (and of the drawn token's position) are
        # not the sequence's: its catch-up starts after the accepted tokens.
        state.drafted = min(state.drafted, seq.num_tokens - 1)
