"""Paged attention over per-layer KV pools, with one backend chosen at start-up."""

from __future__ import annotations

import mlx.core as mx

from nanovllm_mlx.attention import cuda
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.metadata import AttentionBackend


def select_backend(sinks: bool = False) -> AttentionBackend:
    """The one place the attention path is chosen: the CUDA decode kernel on an MLX CUDA
    build running on its GPU (unless NANOVLLM_PAGED_KERNEL=0), else the pure-MLX gather
    path, with fused SDPA on a GPU and matmuls on the CPU. sinks: the model has attention
    sinks (gpt-oss), which the CUDA kernel does not implement (untested on a GPU, so not
    written): such models take the gather path with fused SDPA, which has them, on CUDA too."""
    if cuda.available() and not sinks:
        return cuda.CudaPagedAttention()
    return GatherAttention(fused=mx.default_device() != mx.cpu)
