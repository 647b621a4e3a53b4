"""The key of a full KV block in the prefix cache, shared by the block manager (blocks)
and the state slots (recurrent-state snapshots at block boundaries)."""

from __future__ import annotations

from array import array

import xxhash


def block_hash(token_ids: list[int], prev_hash: int | None) -> int:
    """Hash of a full block, chained on the previous block's so equal blocks at different
    positions (after different prefixes) never collide."""
    h = xxhash.xxh64()
    if prev_hash is not None:
        h.update(prev_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()
