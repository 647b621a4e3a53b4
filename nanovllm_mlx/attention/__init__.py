"""Paged attention over per-layer KV pools, with one backend chosen at start-up."""

from __future__ import annotations

import os

import mlx.core as mx

from nanovllm_mlx.attention import cuda, cuda_write
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.metadata import AttentionBackend


def select_backend(
    latent: bool = False, quantized_kv: bool = False, sinks: bool = False
) -> AttentionBackend:
    """The one place the attention path is chosen: the CUDA decode kernel on an MLX CUDA
    build running on its GPU (unless NANOVLLM_PAGED_KERNEL=0), else the pure-MLX gather
    path, with fused SDPA on a GPU and matmuls on the CPU.

    latent: the model's caches are latent (multi-head latent attention: one K pool whose
    leading dims are also the values, KVCache.value_dim). The CUDA kernel reads a V pool
    of the keys' width and has never run on a latent cache, so those models take the
    gather path on CUDA too.

    quantized_kv: the pools hold quantized codes (--kv-cache-dtype int8/int4, K and V
    alike or not). The CUDA kernel reads them, dequantizing in registers
    (attention/cuda_source.py), unless NANOVLLM_KV_QUANT_KERNEL=0 (cuda.reads_quantized);
    else they take the gather path. Prefill gathers and dequantizes the blocks it reads
    either way.

    sinks: the model has attention sinks (gpt-oss), which the CUDA kernel does not
    implement (untested on a GPU, so not written): such models take the gather path with
    fused SDPA, which has them, on CUDA too.

    On CUDA, all-decode steps write their K/V in place (attention/cuda_write.py; a
    quantized pool's rows quantized by cuda_quantize's kernel; NANOVLLM_IN_PLACE_WRITES=0
    turns it off, NANOVLLM_QUANTIZED_IN_PLACE=0 for quantized pools alone).

    On CUDA, NANOVLLM_CHUNK_BUCKETS=1 pads prompt chunks' attention to a few shapes
    (attention/chunk_shapes.py: off by default, its gain not shown)."""
    buckets = cuda.on_gpu() and os.environ.get("NANOVLLM_CHUNK_BUCKETS", "0") == "1"
    if cuda.available() and not (latent or sinks or (quantized_kv and not cuda.reads_quantized())):
        in_place = cuda_write.quantized_enabled() if quantized_kv else cuda_write.enabled()
        return cuda.CudaPagedAttention(in_place=in_place, chunk_buckets=buckets)
    fused = mx.default_device() != mx.cpu
    return GatherAttention(fused=fused, cudnn_views=cuda.on_gpu(), chunk_buckets=buckets)
