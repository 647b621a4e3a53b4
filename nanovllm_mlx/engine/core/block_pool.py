"""The KV cache's blocks: which are free, how many sequences hold each, and which hold a
published prefix. Plain Python, no MLX arrays; engine/core/block_manager.py decides which
blocks a sequence gets, this module keeps the counts right as it does (vLLM v1 splits its
KVCacheManager and BlockPool the same way).

A free block keeps its K/V and its hash until it is taken again, so a prefix stays
cached after the sequences that computed it are gone; free blocks are taken in the order
they were freed (LRU eviction).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockPool:
    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered: blocks freed longest ago are reused first, so recently freed
        # blocks keep their cached contents the longest (LRU eviction).
        self.free_ids: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        # Counted as they change, not walked: stats() runs after every server step, and
        # walking 8k blocks took ~0.5 ms there.
        self.num_cached_free = 0  # free blocks that still hold a published prefix
        self.num_shared = 0  # blocks held by more than one sequence now
        self.num_saved = 0  # references beyond each block's first

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def lookup(self, h: int, tokens: list[int]) -> int | None:
        """The block holding a published prefix block with this hash and these tokens."""
        block_id = self.hash_to_block.get(h)
        if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
            return None
        return block_id

    def take(self, after: int | None = None) -> int:
        """A free block, the one freed longest ago; but when `after` (the block the new
        one follows in a table) has a free successor that holds no cached prefix, that
        one, out of LRU order and evicting nothing: a sequence whose blocks are
        consecutive has its keys read in place by the gather backend's SDPA instead of
        copied every step (attention/gather.py)."""
        if not self.free_ids:
            raise RuntimeError("out of KV cache blocks")
        nxt = None if after is None else after + 1
        if nxt in self.free_ids and self.blocks[nxt].hash is None:
            block_id = nxt
        else:
            block_id = next(iter(self.free_ids))
        del self.free_ids[block_id]
        block = self.blocks[block_id]
        # Reusing a cached block evicts its contents from the prefix cache.
        if block.hash is not None:
            self.num_cached_free -= 1
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
        block.hash = None
        block.token_ids = ()
        block.ref_count = 1
        return block_id

    def hold(self, block_id: int) -> None:
        """One more reference to a block: a free one holding a cached prefix comes back
        into use as it is, one in use is shared."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
            self.num_cached_free -= 1  # only a published block is held while free
            block.ref_count = 1
            return
        block.ref_count += 1
        self.num_saved += 1
        self.num_shared += block.ref_count == 2

    def release(self, block_id: int) -> None:
        """One reference fewer; a block no sequence holds becomes free, keeping its K/V
        and its hash until it is taken again."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self.free_ids[block_id] = None
            self.num_cached_free += block.hash is not None
            return
        self.num_saved -= 1
        self.num_shared -= block.ref_count == 1

    def publish(self, block_id: int, h: int, tokens: list[int]) -> None:
        """Make a computed full block findable by its prefix hash."""
        block = self.blocks[block_id]
        block.hash = h
        block.token_ids = tuple(tokens)
        self.hash_to_block[h] = block_id
