"""Prompt chunks' attention padded to a few shapes, for MLX's CUDA build (opt-in:
NANOVLLM_CHUNK_BUCKETS=1).

There, fused SDPA over a chunk runs a cuDNN graph built for its exact query and key
lengths (and strides) on first use, and kept in an LRU of 256 (mlx/backend/cuda/
scaled_dot_product_attention.cpp, build_sdpa_cache_key). Every new prompt length builds
one: on an H100, compare_mlx_lm.py's 8-request workload (prompts of 256-2,048 tokens)
spent 4.90 s in its prompt steps the first time and 1.05 s when the same prompts came
again (benchmarks/logs/h100_llama3_8b_q4_v17_batch.log). A Mac's Metal kernels are not
built per shape, so other backends leave chunks as they are.

Measured (benchmarks/RESULTS.md v18, H100, 8B 4-bit, the 8-request workload's rounds of
new prompt lengths): prompt steps 3.15 / 5.62 / 3.28 s a round with it, 4.25 / 5.75 s
without, within what the rounds' own differences explain; most of the first-time cost
there was our 4-bit product's builds for new row counts (models/cuda_qmv.py pads those
now). Its padding costs attention work (up to a quarter at 1k tokens, ~2% of a 16k
prompt's time to first token, estimated), so it stays off until a run shows a gain.

A chunk of n queries at positions [start, start + n) reads keys [0, start + n), causal
with the queries aligned to the last keys. Padding it with `back` queries and keys after
the real ones and `front` queries before them keeps every real query's keys: the keys
added come after all of them, and the offset between the last query and the last key
(start, after the front queries) is unchanged. Both lengths land on `bucket()`'s sizes:
keys first, start + n + back = bucket(start + n); then queries, front + n + back =
bucket(n + back), which is at most the keys' bucket (bucket is monotone and a bucket's
bucket is itself), so SDPA's causal mode stays in the case it supports (queries no more
than keys) and every front query sees at least the first key. The padded keys are pool
slots past the sequence's (zeroed at allocation, or another sequence's finite values),
weighted zero for every real query.
"""

from __future__ import annotations

MIN_UNIT = 16  # sizes up to 64 are multiples of 16
MAX_UNIT = 256  # ... and sizes above 1,024 multiples of 256


def bucket(n: int) -> int:
    """The smallest size >= n among multiples of 16 up to 64, four steps an octave up to
    1,024 (a quarter of padding at most, on chunks whose attention is a small part of the
    step), then multiples of 256 (at 16k tokens attention is about a quarter of a
    prefill's work, so padding stays within 256 rows there). The 256-2,048-token prompts
    above land on 13 sizes."""
    unit = min(max((1 << max(n - 1, 1).bit_length()) // 8, MIN_UNIT), MAX_UNIT)
    return -(-n // unit) * unit


def padding(start: int, n: int) -> tuple[int, int]:
    """(front, back): queries to add before a chunk of n queries at position start, and
    queries and keys to add after it, so its shapes are (bucket(n + back), bucket(start +
    n)); see the module's docstring."""
    back = bucket(start + n) - (start + n)
    return bucket(n + back) - (n + back), back
