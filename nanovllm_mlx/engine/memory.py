"""How many KV-cache blocks the engine gets: the one place that sizes the pools."""

from __future__ import annotations

import mlx.core as mx

from nanovllm_mlx import backend
from nanovllm_mlx.config import Config
from nanovllm_mlx.models.base import ModelSpec

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = 1 * GiB


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: mx.Dtype) -> int:
    return 2 * spec.n_layers * block_size * spec.n_kv_heads * spec.head_dim * dtype.size


def num_kv_blocks(spec: ModelSpec, config: Config, dtype: mx.Dtype, max_model_len: int) -> int:
    per_block = kv_bytes_per_block(spec, config.block_size, dtype)
    per_seq = -(-max_model_len // config.block_size)
    if config.kv_cache_gb is not None:
        num_blocks = int(config.kv_cache_gb * GiB) // per_block
        if num_blocks < per_seq:
            raise ValueError(
                f"kv_cache_gb={config.kv_cache_gb} holds {num_blocks} blocks of "
                f"{config.block_size} tokens, fewer than one {max_model_len}-token "
                f"sequence needs ({per_seq}); raise it or lower max_model_len"
            )
        return num_blocks
    # Enough for every sequence at full length, but no more than a share of memory.
    wanted = per_seq * config.max_num_seqs
    affordable = int(backend.device_memory_bytes() * config.kv_cache_fraction) // per_block
    if mx.default_device() == mx.cpu:
        # The OS zero-fills every page of the pool at start-up (~1 GB/s here: 19 s for
        # 6 GB); a CPU serves few sequences at once, and preemption covers the rest.
        affordable = min(affordable, CPU_DEFAULT_KV_BYTES // per_block)
    return max(per_seq, min(wanted, affordable))
