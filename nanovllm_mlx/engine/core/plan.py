"""A step's records, plain data: what the scheduler plans (StepPlan, one ScheduledSeq per
sequence), what the runner answers (StepResult), and what the scheduler's update makes of
that (StepUpdate). The modules that prepare, run, count or mirror a step read these, not
the scheduling policy that made them (vLLM's SchedulerOutput / ModelRunnerOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanovllm_mlx.engine.core.sequence import Sequence

if TYPE_CHECKING:
    from nanovllm_mlx.engine.sample.logprobs import RowSample


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Hybrid models: after `at` tokens of an entry's chunk (a block boundary), its
    recurrent state is also written to snapshot `slot`, which serves `block_hash` once
    the step has run (engine/core/state_slots.py)."""

    at: int
    slot: int
    block_hash: int


@dataclass(slots=True)
class ScheduledSeq:
    """num_new_tokens tokens of seq from position `start` (default: the tokens computed
    so far), their K/V to compute this step. Fixed when made: the scheduler's update
    moves the sequence on, never the record.

    A speculating decode carries `draft`, tokens proposed after the sequence's last one
    (engine/core/speculation.py): its chunk is that last token and the draft, and every
    one of its positions is sampled, so that the draft can be verified (one row each)."""

    seq: Sequence
    num_new_tokens: int
    start: int = -1
    snapshots: tuple[Snapshot, ...] = ()  # hybrid models: state snapshots to write
    draft: list[int] = field(default_factory=list)
    # This chunk reaches the sequence's end (its draft's end), so its logits are sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.seq.num_computed_tokens
        end = self.seq.num_tokens + len(self.draft)
        self.samples = self.start + self.num_new_tokens == end

    @property
    def num_rows(self) -> int:
        """Sampled rows: the last position, and one per draft token before it."""
        return 1 + len(self.draft) if self.samples else 0

    def tokens(self, shift: int = 0) -> list[int]:
        """The chunk's token ids (`shift` positions further: a step launched ahead)."""
        start = self.start + shift
        end = start + self.num_new_tokens
        if not self.draft:
            return self.seq.token_ids[start:end]
        return (self.seq.token_ids[start:] + self.draft)[: end - start]


@dataclass(slots=True)
class StepPlan:
    """One step as the scheduler decided it."""

    batch: list[ScheduledSeq]  # running sequences first, oldest first; then admitted ones
    # (source, copy) blocks whose K/V the runner copies before the step: copy-on-write of
    # blocks that forks share (BlockManager.take_copies).
    copies: list[tuple[int, int]] = field(default_factory=list)
    # Launch the next step before reading this one back: the scheduler reserved its blocks
    # (Scheduler.reserve_ahead).
    look_ahead: bool = False
    # (source, destination) recurrent-state slots the runner copies before the step:
    # forks' states and restored prefix snapshots (StateSlots.take_copies).
    state_copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class StepResult:
    """What the runner computed for a plan (engine/runner/execute.py). Every entry of the plan
    ran but those in `failed`, which the engine ends with the error."""

    # One per sampled row of the entries that ran, in plan order (ScheduledSeq.num_rows:
    # one an entry, 1 + len(draft) for a speculating one).
    tokens: list[int]
    logprobs: list[RowSample | None] | None  # what the sampler read back for each, if any
    failed: list[tuple[ScheduledSeq, str]] = field(default_factory=list)  # (entry, error)


@dataclass(slots=True)
class StepUpdate:
    """The scheduler's account of a step once its tokens are in (Scheduler.update)."""

    ran: list[ScheduledSeq]  # the entries that ran, their sequences now advanced
    sampled: list[Sequence]  # sequences that sampled a token, forks off them included
    # What the sampler read back for each new token, in the order of `sampled`.
    samples: list[RowSample | None] | None
    # Tokens each sequence of `sampled` gained (its last ones): 1, or more where a draft
    # was accepted. None: one each.
    counts: list[int] | None = None
