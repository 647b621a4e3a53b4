"""Block manager: allocation, sharing, freeing, hash reuse, exhaustion. No MLX."""

import random

import pytest

from nanovllm_mlx.attention.metadata import NULL_BLOCK
from nanovllm_mlx.engine.core.block_manager import BlockManager, block_hash
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.sampling_params import SamplingParams

BS = 4


def seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Pretend a step computed all of s's tokens, as the scheduler's update does."""
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)
    return s


def test_allocate_covers_all_tokens_and_free_returns_blocks():
    bm = BlockManager(10, BS)
    s = seq(list(range(10)))
    assert bm.can_allocate(s)
    assert bm.allocate(s) == 0  # no cached prefix: nothing computed yet
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 7
    bm.free(s)
    assert bm.num_free_blocks == 10 and s.block_table == []


def test_hash_is_chained_on_the_prefix():
    assert block_hash([1, 2, 3, 4], None) != block_hash([1, 2, 3, 4], block_hash([9] * 4, None))
    assert block_hash([1, 2, 3, 4], 7) == block_hash([1, 2, 3, 4], 7)


def test_shared_prefix_is_reused_with_reference_counts():
    bm = BlockManager(10, BS)
    a = seq(list(range(10)), 0)
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(8)) + [99, 98, 97], 1)
    assert bm.allocate(b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8
    assert bm.pool.blocks[a.block_table[0]].ref_count == 2
    bm.free(a)
    assert bm.pool.blocks[b.block_table[0]].ref_count == 1
    assert bm.stats().prefix_hit_tokens == 8


def test_blocks_are_hashed_only_once_computed():
    bm = BlockManager(10, BS)
    a = seq(list(range(12)), 0)
    bm.allocate(a)
    b = seq(list(range(12)), 1)
    bm.allocate(b)  # a's K/V are not computed yet: no hit
    assert b.num_cached_tokens == 0
    a.num_computed_tokens = 5  # first chunk done: one full block
    bm.commit(a)
    c = seq(list(range(12)), 2)
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]


def test_last_token_is_always_computed_even_on_a_full_hit():
    bm = BlockManager(10, BS)
    a = seq(list(range(8)), 0)
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(8)), 1)
    cached = bm.allocate(b)
    # Both blocks are cached, but the block holding the last token is recomputed.
    assert b.num_cached_tokens == cached == 4
    assert b.num_tokens - cached >= 1


def test_freed_blocks_keep_their_hash_until_reallocated():
    bm = BlockManager(4, BS)
    a = seq(list(range(9)), 0)
    bm.allocate(a)
    computed(bm, a)
    first = a.block_table[:2]
    bm.free(a)
    assert bm.stats().cached == 2
    b = seq(list(range(9)), 1)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == first and b.num_cached_tokens == 8
    bm.free(b)
    # Now fill the pool with other tokens: cached blocks get evicted and rehashed.
    c = seq([100 + i for i in range(16)], 2)
    bm.allocate(c)
    computed(bm, c)
    d = seq(list(range(9)), 3)
    bm.free(c)
    bm.allocate(d)
    assert d.num_cached_tokens == 0  # stale entries never hit
    assert all(bm.pool.blocks[i].token_ids == () for i in d.block_table) or d.num_cached_tokens == 0


def test_eviction_prefers_blocks_freed_longest_ago_and_tails_first():
    bm = BlockManager(7, BS)
    a = seq(list(range(12)), 0)  # 3 blocks
    bm.allocate(a)
    computed(bm, a)
    table = list(a.block_table)
    bm.free(a)
    # Four never-used blocks go first, then a's tail block; its prefix stays cached.
    others = [seq([500 + 10 * i, 501, 502], i + 1) for i in range(5)]
    for s in others:
        bm.allocate(s)
    assert bm.pool.blocks[table[2]].hash is None
    assert bm.pool.blocks[table[0]].hash is not None and bm.pool.blocks[table[1]].hash is not None
    bm.free(others[0])
    again = seq(list(range(8)) + [1], 9)
    bm.allocate(again)
    assert again.num_cached_tokens == 8 and again.block_table[:2] == table[:2]


def test_exhaustion():
    bm = BlockManager(3, BS)
    a = seq(list(range(8)), 0)
    bm.allocate(a)
    b = seq(list(range(50, 58)), 1)
    assert not bm.can_allocate(b)
    c = seq(list(range(50, 53)), 2)
    assert bm.can_allocate(c)
    bm.allocate(c)
    # c grows into a second block: none left.
    c.token_ids += [1, 2]
    assert not bm.can_append(c)
    with pytest.raises(RuntimeError, match="out of KV cache blocks"):
        bm.append_slots(c)


def test_append_slots_adds_a_block_only_at_a_block_boundary():
    bm = BlockManager(4, BS)
    s = seq([1, 2, 3, 4])
    bm.allocate(s)
    s.token_ids.append(5)
    assert bm.can_append(s)
    bm.append_slots(s)
    assert len(s.block_table) == 2
    s.token_ids.append(6)
    bm.append_slots(s)
    assert len(s.block_table) == 2


def test_can_allocate_counts_hits_on_free_cached_blocks_as_consuming_free_blocks():
    bm = BlockManager(3, BS)
    a = seq(list(range(9)), 0)  # 3 blocks, everything
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    b = seq(list(range(9)), 1)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert bm.num_free_blocks == 0 and b.num_cached_tokens == 8


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = seq(list(range(10)), 0)
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(10)), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_the_cached_count_follows_every_operation():
    """stats().cached is counted as blocks change, not recounted: check it against a
    recount through a few hundred random allocations, commits, frees and evictions."""
    rng = random.Random(0)
    bm = BlockManager(24, BS)
    live: list[Sequence] = []
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(4)]
    for i in range(400):
        if live and (rng.random() < 0.45 or not bm.num_free_blocks):
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prefixes)[: rng.randint(1, 12)] + [rng.randrange(50)]
            s = seq(tokens, i)
            if bm.can_allocate(s):
                bm.allocate(s)
                computed(bm, s)
                live.append(s)
        recount = sum(1 for b in bm.pool.free_ids if bm.pool.blocks[b].hash is not None)
        assert bm.stats().cached == recount, i


# ------------------------------------------------------------------ sliding windows


def advance(bm: BlockManager, s: Sequence, n: int) -> int:
    """n more tokens computed, as the scheduler's update does: commit, then free what left the
    window."""
    s.num_computed_tokens += n
    bm.commit(s)
    return bm.free_out_of_window(s)


def test_blocks_out_of_every_window_are_freed_as_the_sequence_advances():
    bm = BlockManager(16, BS, sliding_window=6)
    s = seq(list(range(20)))
    bm.allocate(s)
    table = list(s.block_table)
    # After 9 tokens the next query (position 9) sees keys 4..9: block 0 (keys 0-3) is out.
    assert advance(bm, s, 9) == 1
    assert s.block_table[0] == NULL_BLOCK and s.block_table[1:] == table[1:]
    assert bm.num_free_blocks == 16 - 5 + 1
    assert advance(bm, s, 0) == 0  # nothing new: idempotent
    # Position 20 sees 15..20: blocks 0-2 (keys 0-11) are out, block 3 (12-15) is not.
    assert advance(bm, s, 11) == 2
    assert s.block_table[:3] == [NULL_BLOCK] * 3 and s.block_table[3:] == table[3:]
    bm.free(s)
    assert bm.num_free_blocks == 16 and s.num_freed_blocks == 0


def test_a_window_wider_than_the_sequence_frees_nothing_and_no_window_never_frees():
    for window in (None, 64):
        bm = BlockManager(16, BS, sliding_window=window)
        s = seq(list(range(40)))
        bm.allocate(s)
        assert advance(bm, s, 40) == 0 and NULL_BLOCK not in s.block_table


def test_freed_window_blocks_stay_valid_prefix_cache_entries_until_reused():
    bm = BlockManager(16, BS, sliding_window=4)
    a = seq(list(range(13)), 0)
    bm.allocate(a)
    advance(bm, a, 13)  # position 13 sees 10..13: blocks 0 and 1 freed, hashes kept
    assert a.block_table[:2] == [NULL_BLOCK] * 2
    # Another request with the same prompt reuses their K/V (still in the pool).
    b = seq(list(range(13)), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 12 and b.block_table[2] == a.block_table[2]
    bm.free(b)
    bm.free(a)
    # Once a freed block is handed to other data, the chain through it is gone.
    c = seq([99] * 56, 2)  # 14 blocks: every free block but the last two freed
    bm.allocate(c)
    bm.free(c)
    d = seq(list(range(13)), 3)
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_chunked_prefill_frees_between_chunks_and_preemption_resets():
    bm = BlockManager(32, BS, sliding_window=5)
    s = seq(list(range(40)))
    bm.allocate(s)
    assert advance(bm, s, 16) == 3  # the next chunk starts at 16 and needs keys from 12
    assert advance(bm, s, 16) == 4
    assert s.num_freed_blocks == 7
    bm.free(s)  # preempted: recomputed from scratch later
    assert bm.num_free_blocks == 32 and s.block_table == []
    bm.allocate(s)
    assert NULL_BLOCK not in s.block_table and s.num_freed_blocks == 0


def test_sliding_window_must_be_positive():
    with pytest.raises(ValueError, match="sliding_window"):
        BlockManager(4, BS, sliding_window=0)


def test_a_growing_sequence_takes_the_block_after_its_last_when_free_and_uncached():
    """A lone stream (the gather backend reads its keys in place when its blocks are
    consecutive) keeps a consecutive table although LRU order would hand it another
    block; a free successor that still holds a cached prefix is left alone: nothing is
    evicted out of LRU order."""
    bm = BlockManager(8, BS)
    other = seq(list(range(100, 103)), 1)
    bm.allocate(other)  # block 0
    bm.free(other)  # LRU order now 1..7, then 0
    lone = seq(list(range(3)), 0)
    bm.allocate(lone)  # block 1
    gap = seq(list(range(200, 203)), 2)
    bm.allocate(gap)  # block 2
    bm.free(gap)  # LRU order: 3..7, 0, 2
    for _ in range(2):
        lone.token_ids.extend([7] * BS)
        bm.append_slots(lone)
    assert lone.block_table == [1, 2, 3]  # 2 out of LRU order, then 3

    bm = BlockManager(6, BS)
    grow = seq([9, 9, 9], 0)
    bm.allocate(grow)  # block 0
    cached = seq(list(range(8)), 1)
    bm.allocate(cached)  # blocks 1 and 2
    computed(bm, cached)
    bm.free(cached)  # free, both holding a cached prefix
    grow.token_ids.extend([7] * BS)
    bm.append_slots(grow)
    assert grow.block_table == [0, 3]  # not 1: that would evict a cached prefix
    assert bm.pool.blocks[1].hash is not None and bm.pool.blocks[2].hash is not None
