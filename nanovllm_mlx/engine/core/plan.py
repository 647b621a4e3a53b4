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
    moves the sequence on, never the record."""

    seq: Sequence
    num_new_tokens: int
    start: int = -1
    snapshots: tuple[Snapshot, ...] = ()  # hybrid models: state snapshots to write
    # This chunk reaches the sequence's end, so its last logits are sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.seq.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens


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

    tokens: list[int]  # one per sampling entry that ran, in plan order
    logprobs: list[RowSample | None] | None  # what the sampler read back for each, if any
    failed: list[tuple[ScheduledSeq, str]] = field(default_factory=list)  # (entry, error)


@dataclass(slots=True)
class StepUpdate:
    """The scheduler's account of a step once its tokens are in (Scheduler.update)."""

    ran: list[ScheduledSeq]  # the entries that ran, their sequences now advanced
    sampled: list[Sequence]  # sequences that sampled a token, forks off them included
    samples: list[RowSample | None] | None  # what the sampler read back for each
