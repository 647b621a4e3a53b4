"""Slots of the recurrent-state pool (hybrid models: Qwen3.5's linear-attention layers),
plain Python: the runner holds the arrays (attention/state.py), this holds who uses which
row. The block manager calls it as it allocates, frees and forks a sequence's blocks.

A running sequence owns one slot, from admission to its end or preemption; a preempted
sequence loses its state and recomputes it on resume, as it does its K/V (from the prefix
cache where it can). A fork (the choices of an n > 1 request) gets its own slot with a copy
of its parent's state, queued like a block copy and made before the next step runs.

Prefix caching for hybrids: attention layers find a cached prefix in its blocks, but the
recurrent layers need the state after exactly that prefix. So the step that computes a
block boundary also writes the state there into a snapshot slot, published under that
block's hash once the step has run (as block hashes are). A prompt whose cached prefix
ends at a block with a snapshot restores it (a copy into its own slot) and starts
there; a prefix whose last block has no snapshot is cut back to the last one that has.
Snapshots are evicted least recently used first; while a sequence decodes, its newest
snapshot replaces its previous one, so a long answer keeps one (its last block boundary:
what the next turn of a chat, or its own resume after a preemption, starts from).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from nanovllm_mlx.engine.core.hashing import block_hash as hash_block
from nanovllm_mlx.engine.core.plan import Snapshot
from nanovllm_mlx.engine.core.sequence import Sequence


@dataclass(slots=True)
class StateStats:
    slots: int
    used: int
    snapshots: int  # snapshot slots
    cached: int  # snapshots held now
    restored: int  # prompts that started from a snapshot so far


class StateSlots:
    def __init__(self, num_slots: int, num_snapshots: int, block_size: int):
        if num_slots < 1 or num_snapshots < 0:
            raise ValueError("a state pool needs >= 1 slot and >= 0 snapshots")
        self.block_size = block_size
        self.num_slots = num_slots
        self.num_snapshots = num_snapshots
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: 0 first
        self._free_snapshots = list(range(num_slots + num_snapshots - 1, num_slots - 1, -1))
        self._snapshots: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, LRU
        self._copies: list[tuple[int, int]] = []
        self.num_restored = 0

    @property
    def total(self) -> int:
        """Rows of the runner's pool, snapshots included (the runner adds a scratch row)."""
        return self.num_slots + self.num_snapshots

    def stats(self) -> StateStats:
        return StateStats(
            self.num_slots,
            self.num_slots - len(self._free),
            self.num_snapshots,
            len(self._snapshots),
            self.num_restored,
        )

    def can_allocate(self, count: int = 1) -> bool:
        return len(self._free) >= count

    def allocate(self, seq: Sequence) -> None:
        assert seq.state_slot < 0, f"sequence {seq.seq_id} already has a state slot"
        if not self._free:
            raise RuntimeError("out of recurrent-state slots")
        seq.state_slot = self._free.pop()

    def free(self, seq: Sequence) -> None:
        slot = seq.state_slot
        if slot < 0:
            return
        # A copy still queued into this slot is for its old owner, not for the next one.
        self._copies = [(s, d) for s, d in self._copies if d != slot]
        self._free.append(slot)
        seq.state_slot = -1
        seq.decode_snapshot = None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        self.allocate(child)
        self._copies.append((parent.state_slot, child.state_slot))

    def has_snapshot(self, block_hash: int) -> bool:
        return block_hash in self._snapshots

    def restore(self, seq: Sequence, block_hash: int) -> None:
        """seq starts from the snapshot at block_hash: copied into its slot before the
        step runs (a snapshot evicted later in the same schedule is overwritten only by
        that step's forward, after the copy)."""
        slot = self._snapshots[block_hash]
        self._snapshots.move_to_end(block_hash)
        self._copies.append((slot, seq.state_slot))
        self.num_restored += 1

    def plan(self, seq: Sequence, num_new_tokens: int) -> tuple[Snapshot, ...]:
        """The snapshots an entry computing num_new_tokens of seq from its computed ones
        writes: at the last block boundary its chunk reaches, and at the end of a prefix
        it shares with an earlier prompt (Sequence.state_mark: a shared system prompt is
        then restorable from the third request on), each unless kept already. None for a
        sequence in its prompt-logprobs pass (that pass runs part of the chunk apart)."""
        if self.num_snapshots == 0 or seq.prompt_logprobs_pending:
            return ()
        bs, start = self.block_size, seq.num_computed_tokens
        end = (start + num_new_tokens) // bs * bs
        marks = sorted({b for b in (seq.state_mark, end) if start < b <= end and b > 0})
        snapshots = []
        h = seq.block_hashes[-1] if seq.block_hashes else None
        done = len(seq.block_hashes)
        for boundary in marks:
            for i in range(done, boundary // bs):
                h = hash_block(seq.token_ids[i * bs : (i + 1) * bs], h)
            done = boundary // bs
            assert h is not None
            slot = self.reserve(h)
            if slot is not None:
                snapshots.append(Snapshot(boundary - start, slot, h))
        return tuple(snapshots)

    def reserve(self, block_hash: int) -> int | None:
        """A snapshot slot for the state at the end of this block, or None (one exists,
        or there are no snapshot slots). Published by publish() after the step."""
        if self.num_snapshots == 0 or block_hash in self._snapshots:
            return None
        if not self._free_snapshots:
            if not self._snapshots:
                return None  # all reserved by this step's other entries
            _, slot = self._snapshots.popitem(last=False)  # the least recently used
            return slot
        return self._free_snapshots.pop()

    def publish(self, seq: Sequence, block_hash: int, slot: int, decoding: bool) -> None:
        """The step that wrote snapshot `slot` ran: it now serves block_hash. A decoding
        sequence's newer snapshot replaces its previous one."""
        if block_hash in self._snapshots:  # another sequence published it meanwhile
            self.release(slot)
            return
        self._snapshots[block_hash] = slot
        if decoding:
            old = seq.decode_snapshot
            if old is not None and old in self._snapshots:
                self.release(self._snapshots.pop(old))
            seq.decode_snapshot = block_hash

    def release(self, slot: int) -> None:
        """A reserved snapshot slot whose step failed, or a superseded snapshot's."""
        self._free_snapshots.append(slot)

    def take_copies(self) -> list[tuple[int, int]]:
        """(source, destination) slot pairs queued since the last call: forks' states and
        restored snapshots, copied by the runner before the step."""
        copies, self._copies = self._copies, []
        return copies
