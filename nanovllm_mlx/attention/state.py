"""Recurrent state of linear-attention layers (Gated DeltaNet): the interface next to the
paged KV cache's (metadata.py), importing nothing of ours.

Such a layer keeps no keys: each sequence carries a fixed-size state instead, the last
K - 1 inputs of its causal convolution and a [heads, key_dim, value_dim] matrix. The
states live in one pool per layer, a row per slot (StateCache); the block manager hands a
running sequence its slot (engine/core/state_slots.py) and the step tells every layer
which slot each flat token's sequence reads and writes (StateSteps). Some slots hold
snapshots of a sequence's state at a block boundary, which a later prompt with the same
prefix starts from (prefix caching for hybrid models).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from nanovllm_mlx.interop import to_mx


@dataclass(slots=True)
class StateCache:
    """One layer's state pool: conv [slots, K - 1, conv_dim] and ssm [slots, heads,
    key_dim, value_dim]. Written by scatter, in place when the pool has no other
    reference (as KVCache)."""

    conv: mx.array
    ssm: mx.array

    def write(self, slots: mx.array, conv: mx.array, ssm: mx.array) -> None:
        """Rows `slots` of both pools. Through a reshaped view, as KVCache.write: the
        pool objects held before (ModelRunner._launch keeps them to undo a step that
        fails while it is built) keep their contents; in-place __setitem__ on them would
        change those objects too."""
        for name, new in (("conv", conv), ("ssm", ssm)):
            pool = getattr(self, name)
            flat = pool.reshape(pool.shape[0], -1)
            flat[slots] = new.reshape(new.shape[0], -1).astype(pool.dtype)
            setattr(self, name, flat.reshape(pool.shape))

    def copy(self, src: mx.array, dst: mx.array) -> None:
        """Rows src to rows dst, all read before any is written."""
        self.write(dst, self.conv[src], self.ssm[src])


def state_pools(
    layers: tuple[int, ...],
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None,
    num_slots: int,
    dtype: mx.Dtype,
) -> list[StateCache]:
    """One pool per recurrent layer (ModelSpec.state_layers, .state_shapes): num_slots
    rows and a scratch row. The recurrent state is kept in float32, as transformers
    computes it: it sums a decayed history over the whole sequence."""
    if not layers:
        return []
    if shapes is None or num_slots < 1:
        raise ValueError("a model with recurrent layers needs state shapes and state slots")
    conv, ssm = shapes
    rows = num_slots + 1
    return [
        StateCache(mx.zeros((rows, *conv), dtype=dtype), mx.zeros((rows, *ssm), dtype=mx.float32))
        for _ in layers
    ]


@dataclass(frozen=True, slots=True)
class Segment:
    """A prefill chunk of one sequence: flat tokens [offset, offset + length)."""

    offset: int
    length: int
    slot: int
    fresh: bool  # the chunk starts the sequence: its state starts at zero
    # (after this many of its tokens, snapshot slot): where the state is also written
    saves: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class StateSteps:
    """Where each flat token's sequence keeps its state this step. Flat order as in
    AttentionMetadata: the single-token decodes first, then the prefill chunks."""

    num_decode: int
    decode_slots: mx.array  # [Bd] int32
    decode_fresh: mx.array  # [Bd] bool: the decode starts its sequence (a zero state)
    # Decode rows whose new state is also saved as a snapshot, and the snapshot slots.
    save_rows: mx.array | None
    save_slots: mx.array | None
    prefills: list[Segment]


def build_state_steps(
    decode_slots: list[int],
    decode_fresh: list[bool],
    decode_saves: list[tuple[int, int]],
    prefills: list[Segment],
) -> StateSteps:
    """decode_saves: (decode row, snapshot slot) of the decodes that complete a block."""
    rows = [r for r, _ in decode_saves]
    return StateSteps(
        num_decode=len(decode_slots),
        decode_slots=to_mx(np.array(decode_slots, dtype=np.int32)),
        decode_fresh=to_mx(np.array(decode_fresh, dtype=np.bool_)),
        save_rows=to_mx(np.array(rows, dtype=np.int32)) if rows else None,
        save_slots=to_mx(np.array([s for _, s in decode_saves], dtype=np.int32)) if rows else None,
        prefills=prefills,
    )
