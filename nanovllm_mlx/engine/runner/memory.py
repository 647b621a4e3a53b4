"""How many KV-cache blocks the engine gets: the one place that sizes the pools, and
the check that they fit before a byte of them is allocated."""

from __future__ import annotations

import math

import mlx.core as mx

from nanovllm_mlx import backend
from nanovllm_mlx.attention.kv_quant import KVFormat
from nanovllm_mlx.config import Config
from nanovllm_mlx.models.base import ModelSpec

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = 1 * GiB
# Left free beside the pool: activations of a full step, the sampler's vocabulary-wide
# temporaries, the allocator's slack. An explicit --kv-cache-gb past this took a 23 GB
# machine into the OOM killer (exit 137 after 21 GB) instead of an error line.
HEADROOM = 0.10


def kv_bytes_per_block(spec: ModelSpec, block_size: int, formats: tuple[KVFormat, KVFormat]) -> int:
    """The real bytes of one block in all KV layers: K and V in their formats, a quantized
    pool's scales included (KVFormat.row_bytes); a latent cache (MLA) stores K alone."""
    pools = formats[:1] if spec.latent_value_dim is not None else formats
    per_token_head = sum(f.row_bytes(spec.head_dim) for f in pools)
    return len(spec.kv_layers) * block_size * spec.n_kv_heads * per_token_head


def num_kv_blocks(
    spec: ModelSpec,
    config: Config,
    formats: tuple[KVFormat, KVFormat],
    max_model_len: int,
    extra_per_block: int = 0,
) -> int:
    """Blocks of the pool: kv_cache_gb if given, else enough for max_num_seqs full-length
    sequences within a share of the device's memory. extra_per_block: bytes another pool
    holds per block of this one (a draft model's, addressed by the same block tables)."""
    per_block = kv_bytes_per_block(spec, config.block_size, formats) + extra_per_block
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


def state_bytes(spec: ModelSpec, rows: int, dtype: mx.Dtype) -> int:
    """The recurrent-state pools of a hybrid model (attention/state.py state_pools): per
    row, its conv state in the model's dtype and its recurrent state in float32."""
    if spec.state_shapes is None or not rows:
        return 0
    conv, ssm = spec.state_shapes
    per_row = math.prod(conv) * dtype.size + math.prod(ssm) * 4
    return len(spec.state_layers) * (rows + 1) * per_row


def check_fits(
    num_blocks: int, per_block: int, weight_bytes: int, block_size: int, states: int = 0
) -> None:
    """Refuse a KV pool (and recurrent-state pool, `states` bytes) that would not fit in
    what the device has left, with the sizes."""
    pool = num_blocks * per_block + states
    available = backend.available_memory_bytes()
    usable = int(available * (1 - HEADROOM))
    if pool <= usable:
        return
    total = backend.device_memory_bytes()
    raise ValueError(
        f"the KV cache needs {pool / GiB:.2f} GiB ({num_blocks:,} blocks of {block_size} "
        f"tokens{f', {states / GiB:.2f} GiB of recurrent state' if states else ''}) "
        f"but only {available / GiB:.2f} GiB of this device's {total / GiB:.1f} GiB "
        f"is free besides the {weight_bytes / GiB:.2f} GiB of weights already loaded; "
        f"lower --kv-cache-gb (at most ~{usable / GiB:.1f} fits)"
        + (" or --max-num-seqs (a state row each, and as many snapshots)" if states else "")
    )
