"""Continuous batching: every step admits, chunks, preempts, forks and retires. Plain
Python.

The scheduler is the one writer of a sequence's progress (num_computed_tokens): it plans
a step (schedule), and once the step's tokens are in it moves the sequences on (update);
the block manager only returns counts."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from nanovllm_mlx.engine.core.block_manager import BlockManager
from nanovllm_mlx.engine.core.chunk_cost import ChunkCost
from nanovllm_mlx.engine.core.plan import ScheduledSeq, StepPlan, StepResult, StepUpdate
from nanovllm_mlx.engine.core.proposals import assign_drafts
from nanovllm_mlx.engine.core.sequence import Sequence, SequenceStatus
from nanovllm_mlx.engine.core.speculation import Speculator, accepted_prefix

if TYPE_CHECKING:
    from nanovllm_mlx.engine.sample.logprobs import RowSample


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        key_cost: float = 0.0,
        layer_windows: tuple[int | None, ...] = (),
        look_ahead: bool = False,
        speculator: Speculator | None = None,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # What a step's tokens cost of its budget (key_cost: engine/runner/budget.py).
        self.cost = ChunkCost(key_cost, layer_windows)
        self.look_ahead = look_ahead  # plan launches ahead where safe (reserve_ahead)
        # Proposes drafts for decoding sequences (None: no speculative decoding).
        self.speculator = speculator
        self._launched_ahead = False  # the last plan launched this step ahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_waiting(self) -> int:
        """Sequences waiting for admission, each request's choices counted."""
        return sum(seq.width for seq in self.waiting)

    def _slots(self) -> int:
        # A running request whose choices are not forked yet holds their slots already.
        return sum(seq.width for seq in self.running)

    def schedule(self) -> StepPlan:
        """The next step: its batch, the block copies to make first, and whether the step
        after it may be launched before this one is read back."""
        batch = self._batch()
        look_ahead = self.look_ahead and self.reserve_ahead(batch)
        states = self.block_manager.states
        state_copies = states.take_copies() if states is not None else []
        self._launched_ahead = look_ahead
        return StepPlan(batch, self.block_manager.take_copies(), look_ahead, state_copies)

    def _entry(self, seq: Sequence, n: int) -> ScheduledSeq:
        """seq's n tokens this step; a hybrid model also snapshots its state at the block
        boundary they reach (StateSlots.plan)."""
        states = self.block_manager.states
        snapshots = states.plan(seq, n) if states is not None else ()
        return ScheduledSeq(seq, n, snapshots=snapshots)

    def _batch(self) -> list[ScheduledSeq]:
        budget: float = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        widest = 0.0  # the most cached keys a prompt chunk of this step reads
        # Running sequences first, oldest first: decodes never wait behind new prompts. (A
        # prompt still being prefilled is always the newest: its chunk took what was left
        # of the budget, so nothing was admitted after it.)
        scheduled: list[Sequence] = []
        queue = deque(self.running)
        while queue and budget > 0:
            seq = queue.popleft()
            while not self.block_manager.can_append(seq):
                # Out of blocks: recompute the newest sequence later rather than fail.
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq)
                n, cost, widest = self.cost.chunk(seq, budget, widest)
                batch.append(self._entry(seq, n))
                scheduled.append(seq)
                budget -= cost
        self.running = scheduled + list(queue)

        slots = self._slots()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if slots + seq.width > self.max_num_seqs or not self.block_manager.can_allocate(seq):
                break
            slots += seq.width
            self.waiting.popleft()
            seq.num_computed_tokens = self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            n, cost, widest = self.cost.chunk(seq, budget, widest)
            batch.append(self._entry(seq, n))
            self.running.append(seq)
            budget -= cost
        # What decodes and admitted prompts left of the budget goes to drafts. Not in a
        # step launched ahead: that launch computed this batch as plain decodes.
        if self.speculator is not None and not self._launched_ahead:
            assign_drafts(
                batch,
                budget,
                self.speculator,
                self.block_manager,
                self.max_model_len,
                self.cost.token,
            )
        elif self.speculator is not None:
            for item in batch:
                self.speculator.look(item.seq)
        return batch

    def reserve_ahead(self, batch: list[ScheduledSeq]) -> bool:
        """Whether the step after this one can be launched before this one's tokens are
        known, and if so give every sequence the block its next token needs.

        True only when the next schedule() would almost surely return the same batch one
        token further: all running sequences decode this step, none finishes by length,
        no waiting request could be admitted, and there are blocks for all of them. An
        EOS, stop string or abort still changes the batch; the model runner then drops
        the launched step (its cache writes only touch slots past the sequences' ends).
        Penalties over past tokens and grammars need this step's token, so they turn the
        look-ahead off, as do copies of shared blocks still to make.
        """
        if not batch or len(batch) != len(self.running):
            return False
        # The launch proposes nothing: not while a sequence of the batch would.
        if self.speculator is not None and any(self.speculator.active(i.seq) for i in batch):
            return False
        if self.waiting and self._slots() + self.waiting[0].width <= self.max_num_seqs:
            return False
        needed = 0
        for item in batch:
            seq = item.seq
            if item.num_new_tokens != 1 or not item.samples:
                return False
            if seq.params.needs_history or seq.forks:
                return False
            if seq.tokens_left(self.max_model_len) < 2:
                return False
            needed += self.block_manager.blocks_to_write(seq, seq.num_tokens + 1)
        if needed > self.block_manager.num_free_blocks:
            return False
        for item in batch:
            self.block_manager.append_slots(item.seq, item.seq.num_tokens + 1)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        seq.spec = None  # a draft model's K/V went with its blocks: computed again
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _free(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0

    def update(self, plan: StepPlan, result: StepResult) -> StepUpdate:
        """After the step (vLLM's update_from_output): advance every entry of the plan that
        ran, append the sampled tokens (an entry's rows in plan order: a draft's accepted
        tokens and the token drawn after them), give back the blocks of a rejected draft
        tail, publish the blocks they filled, fork the choices off requests that sampled
        their first token, and feed each constrained choice's grammar its token. Whether a
        sequence ends is the output processor's decision, not the scheduler's."""
        failed = {item.seq for item, _ in result.failed}
        ran = [item for item in plan.batch if item.seq not in failed]
        rows = sum(item.num_rows for item in ran)
        assert rows == len(result.tokens), "one sampled token per sampled row"
        sampled: list[Sequence] = []
        counts: list[int] = []
        records: list[RowSample | None] | None = [] if result.logprobs is not None else None
        at = 0
        for item in ran:
            seq, new = item.seq, result.tokens[at : at + item.num_rows]
            accepted = accepted_prefix(item.draft, new)
            if item.samples:
                seq.token_ids += new[: accepted + 1]
                sampled.append(seq)
                counts.append(accepted + 1)
                if records is not None and result.logprobs is not None:
                    records += result.logprobs[at : at + accepted + 1]
            at += item.num_rows
            # The draft's rejected tail was computed, but is not the sequence's.
            seq.num_computed_tokens = item.start + item.num_new_tokens - len(item.draft)
            seq.num_computed_tokens += accepted
            if item.draft:
                assert self.speculator is not None
                self.speculator.record(seq, len(item.draft), accepted)
                self.block_manager.trim(seq, seq.num_tokens)
            self.block_manager.commit(seq)
            self.block_manager.free_out_of_window(seq)
        self._publish_snapshots(plan.batch, failed)
        sampled, counts, records = self._fork_sampled(sampled, counts, records)
        for seq, count in zip(sampled, counts):
            if seq.constraint is not None:
                for token in seq.token_ids[-count:]:
                    seq.constraint.consume(token)
        return StepUpdate(ran, sampled, records, counts)

    def _publish_snapshots(self, batch: list[ScheduledSeq], failed: set[Sequence]) -> None:
        """The state snapshots the step wrote serve their block hashes from now on; a
        failed entry's reserved slot goes back."""
        states = self.block_manager.states
        if states is None:
            return
        for item in batch:
            for snap in item.snapshots:
                if item.seq in failed:
                    states.release(snap.slot)
                else:
                    decoding = item.start >= item.seq.num_prompt_tokens
                    states.publish(item.seq, snap.block_hash, snap.slot, decoding)

    def _fork_sampled(
        self, sampled: list[Sequence], counts: list[int], samples: list[RowSample | None] | None
    ) -> tuple[list[Sequence], list[int], list[RowSample | None] | None]:
        """Fork the choices off the requests that sampled their first token: they join the
        step's sampled sequences with the tokens drawn for them (the sampler draws a
        fork's first token only when it reads extras back, so samples is None otherwise;
        a sequence with forks never carries a draft, so it gained one token)."""
        if samples is None:
            return sampled, counts, samples
        out, out_counts, out_samples = list(sampled), list(counts), list(samples)
        at = 0
        for seq, count in zip(sampled, counts):
            at += count
            sample = samples[at - 1]
            if seq.forks and sample is not None:
                out += self.fork(seq, [token for token, _ in sample.forks])
                out_counts += [1] * len(sample.forks)
                out_samples += [record for _, record in sample.forks]
        return out, out_counts, out_samples

    def fork(self, parent: Sequence, first_tokens: list[int]) -> list[Sequence]:
        """Fork parent's other choices off it once its prompt is computed: each shares
        all of parent's blocks, starts running with its own first token (sampled in the
        same step from the same logits), and copies the partial last block on its first
        write. Call after update has appended parent's own first token."""
        children, parent.forks = parent.forks, []
        assert len(children) == len(first_tokens), "one first token per forked choice"
        for child, token in zip(children, first_tokens):
            self.block_manager.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.token_ids = parent.token_ids[: parent.num_prompt_tokens] + [token]
            child.prompt_logprobs = parent.prompt_logprobs
            child.prompt_logprobs_pending = False
            child.status = SequenceStatus.RUNNING
        # Right after parent, as old as it: a prompt admitted after parent in the same
        # step may still be prefilling, and the oldest sequences are scheduled first.
        at = self.running.index(parent) + 1
        self.running[at:at] = children
        return children

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire seq now and free its blocks; the reason comes from the output processor
        (stop, length) or from an abort."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._free(seq)
        elif seq in self.waiting:  # else a choice not forked off yet: it holds nothing
            self.waiting.remove(seq)
        for child in seq.forks:  # they end with the prompt they were waiting for
            self.finish(child, reason)
        seq.forks = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
