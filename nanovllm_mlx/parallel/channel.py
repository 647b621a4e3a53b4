"""Rank 0 to every rank, over MLX's own collectives (no transport of ours).

A broadcast is an all_sum to which only rank 0 contributes: it works on every backend
MLX has (ring over TCP, jaccl, NCCL, which has no send/recv). Two a step: the record's
length, then the record.
"""

from __future__ import annotations

import mlx.core as mx

from nanovllm_mlx.errors import TensorParallelError


class Channel:
    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def _sum(self, x: mx.array) -> mx.array:
        try:
            out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
            mx.eval(out)
        except RuntimeError as e:  # MLX's "[ring] connection to a peer was lost", ...
            raise TensorParallelError(f"a tensor-parallel rank is gone: {e}") from None
        return out

    def broadcast(self, data: list[int] | None) -> list[int]:
        """Rank 0 passes the ints; the other ranks pass None and get them."""
        n = len(data) if self.rank == 0 and data is not None else 0
        n = int(self._sum(mx.array([n], dtype=mx.int64)).item())
        payload = data if self.rank == 0 and data is not None else [0] * n
        return self._sum(mx.array(payload, dtype=mx.int64)).tolist()

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's values (the same count on each), rank by rank."""
        x = mx.array(values, dtype=mx.int64)
        try:
            out = mx.distributed.all_gather(x, group=self.group, stream=mx.cpu)
            mx.eval(out)
        except RuntimeError as e:
            raise TensorParallelError(f"a tensor-parallel rank is gone: {e}") from None
        return out.reshape(self.size, -1).tolist()
