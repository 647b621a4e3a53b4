"""Which KV-cache blocks each sequence holds, with hash-chained prefix caching. Plain
Python, no MLX arrays; the blocks' counts and the free list are engine/core/block_pool.py's.

Blocks are reference-counted: a prefix-cache hit or a fork (the choices of an n > 1
request) shares a block instead of computing it again. A sequence about to write into a
block it shares gets its own copy first (copy-on-write): the block manager picks the copy
and queues (source, copy) for the engine, which copies the K/V before the step runs.

For a model whose every layer attends over a sliding window (Mistral, Phi-3), the blocks
that fall out of the window of a sequence's next query are freed as it advances, as vLLM
does: their table entries become NULL_BLOCK, and attention never reads them. A model with
any full-attention layer (Gemma 3) keeps all its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanovllm_mlx.attention.metadata import NULL_BLOCK
from nanovllm_mlx.engine.core.block_pool import BlockPool
from nanovllm_mlx.engine.core.hashing import block_hash
from nanovllm_mlx.engine.core.sequence import Sequence

if TYPE_CHECKING:
    from nanovllm_mlx.engine.core.state_slots import StateSlots


@dataclass(slots=True)
class BlockStats:
    num_blocks: int
    used: int
    cached: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    shared: int = 0  # blocks held by more than one sequence now
    saved: int = 0  # blocks sharing saves now: references beyond each block's first
    forked: int = 0  # block references shared by forks so far
    copied: int = 0  # blocks copied on write so far

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
        )


def _last(table: list[int]) -> int | None:
    return table[-1] if table and table[-1] != NULL_BLOCK else None


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
        states: StateSlots | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.num_forked = 0
        self.num_copied = 0
        self._copies: list[tuple[int, int]] = []  # (source, copy) not yet taken
        # Hybrid models: the recurrent-state slots, allocated, freed and forked with the
        # blocks; a cached prefix is only as long as its last restorable state.
        self.states = states

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def stats(self) -> BlockStats:
        return BlockStats(
            num_blocks=self.num_blocks,
            used=self.num_blocks - self.num_free_blocks,
            cached=self.pool.num_cached_free,
            prefix_hit_tokens=self.prefix_hit_tokens,
            prefix_query_tokens=self.prefix_query_tokens,
            shared=self.pool.num_shared,
            saved=self.pool.num_saved,
            forked=self.num_forked,
            copied=self.num_copied,
        )

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block_id, hash) of the longest run of cached full blocks at the start of seq.

        The block holding the last token is never taken from the cache: that token must be
        computed to produce logits, even when the whole prompt was seen before.
        """
        if not self.enable_prefix_caching or seq.prompt_logprobs_pending:
            return []
        hits: list[tuple[int, int]] = []
        prev: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = block_hash(tokens, prev)
            block_id = self.pool.lookup(h, tokens)
            if block_id is None:
                break
            hits.append((block_id, h))
            prev = h
        if self.states is not None:
            # Past the last snapshot, the blocks are shared but their state is not kept:
            # this sequence marks where the shared part ends, for its snapshot there.
            seq.state_mark = len(hits) * bs
            while hits and not self.states.has_snapshot(hits[-1][1]):
                hits.pop()
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        in_use = sum(1 for block_id, _ in hits if self.pool.blocks[block_id].ref_count > 0)
        if self.states is not None and not self.states.can_allocate():
            return False
        return self.blocks_needed(seq.num_tokens) - in_use <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> int:
        """Give seq blocks for all its tokens, sharing cached prefix blocks; returns how
        many of its tokens those hold (the scheduler's to count as computed)."""
        assert not seq.block_table, f"sequence {seq.seq_id} already has blocks"
        hits = self._cached_prefix(seq)
        for block_id, h in hits:
            self.pool.hold(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        for _ in range(self.blocks_needed(seq.num_tokens) - len(hits)):
            seq.block_table.append(self.pool.take(_last(seq.block_table)))
        if self.states is not None:
            self.states.allocate(seq)
            if hits:
                self.states.restore(seq, hits[-1][1])
        cached = len(hits) * self.block_size
        seq.num_cached_tokens = cached
        self.prefix_hit_tokens += cached
        self.prefix_query_tokens += seq.num_tokens
        return cached

    def blocks_to_write(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Free blocks append_slots(seq, num_tokens) takes: new ones, and copies of shared
        blocks the tokens from seq.num_computed_tokens on would be written into."""
        wanted = seq.num_tokens if num_tokens is None else num_tokens
        return self.blocks_needed(wanted) - len(seq.block_table) + len(self._shared_writes(seq))

    def _shared_writes(self, seq: Sequence) -> list[int]:
        """Block-table indices of shared blocks that this sequence's next write would hit:
        at most the block holding its first uncomputed token (a fork's partial last
        prompt block), since every later block is its own."""
        i = seq.num_computed_tokens // self.block_size
        if i < len(seq.block_table) and self.pool.blocks[seq.block_table[i]].ref_count > 1:
            return [i]
        return []

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_to_write(seq) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Grow seq's block table to cover all its tokens (decode adds one token a step),
        or num_tokens of them when the scheduler reserves room for a step ahead; a shared
        block about to be written is replaced by a copy first (see take_copies)."""
        for i in self._shared_writes(seq):
            source = seq.block_table[i]
            copy = self.pool.take()
            self.pool.release(source)
            seq.block_table[i] = copy
            self._copies.append((source, copy))
            self.num_copied += 1
        wanted = seq.num_tokens if num_tokens is None else num_tokens
        for _ in range(self.blocks_needed(wanted) - len(seq.block_table)):
            seq.block_table.append(self.pool.take(_last(seq.block_table)))

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past those num_tokens tokens need: a speculating sequence's
        room for a draft whose tail was rejected. They hold no published hash (commit
        only publishes blocks below num_computed_tokens, all accepted tokens), and the
        K/V the rejected tokens left in the kept last block are past the sequence's end,
        written over before anything reads them."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            if block_id != NULL_BLOCK:
                self.pool.release(block_id)

    def take_copies(self) -> list[tuple[int, int]]:
        """(source, copy) block pairs queued since the last call. The engine copies their
        K/V before running the step that writes the copies: sources are still held by
        another sequence, so no step can reuse them in between."""
        copies, self._copies = self._copies, []
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give child every block of parent, shared: a choice of an n > 1 request starts
        from its prompt's K/V instead of computing them again."""
        assert not child.block_table, f"sequence {child.seq_id} already has blocks"
        held = [block_id for block_id in parent.block_table if block_id != NULL_BLOCK]
        for block_id in held:
            self.pool.hold(block_id)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_tokens = parent.num_cached_tokens
        child.num_freed_blocks = parent.num_freed_blocks
        self.num_forked += len(held)
        if self.states is not None:
            self.states.fork(parent, child)

    def commit(self, seq: Sequence) -> None:
        """Publish the hashes of full blocks whose K/V are now computed.

        Hashes are published only after the step that wrote them, so no other sequence
        can hit a block whose K/V are not in the cache yet.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = block_hash(tokens, seq.block_hashes[-1] if seq.block_hashes else None)
            self.pool.publish(seq.block_table[i], h, tokens)
            seq.block_hashes.append(h)

    def free_out_of_window(self, seq: Sequence) -> int:
        """Free the blocks no query of seq can see any more: those wholly before the window
        of its next position (num_computed_tokens). Returns how many were freed. Only for
        an all-sliding model; the rest of the table keeps its indices.

        Call after commit(): a freed block's hash is already published, and it stays in the
        prefix cache (its K/V are what any sequence with this prefix computes there)."""
        if self.sliding_window is None:
            return 0
        first_key = seq.num_computed_tokens - self.sliding_window + 1
        end = min(max(first_key, 0) // self.block_size, len(seq.block_table))
        for i in range(seq.num_freed_blocks, end):
            # It keeps its hash: its K/V stay valid for any sequence with the same prefix
            # until the block is reused.
            self.pool.release(seq.block_table[i])
            seq.block_table[i] = NULL_BLOCK
        freed = max(0, end - seq.num_freed_blocks)
        seq.num_freed_blocks = max(seq.num_freed_blocks, end)
        return freed

    def free(self, seq: Sequence) -> None:
        # Tail blocks are freed first so they are evicted before the shared prefix blocks.
        for block_id in reversed(seq.block_table):
            if block_id != NULL_BLOCK:
                self.pool.release(block_id)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_freed_blocks = 0
        if self.states is not None:
            self.states.free(seq)
