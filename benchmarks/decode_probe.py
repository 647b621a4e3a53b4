"""What a single stream's decode speed depends on, one factor at a time, on one model.

Part 1: our single-stream decode tok/s (greedy, median of --repeats) after a short and a
long prompt, for each of --configs: KV pool size (GB), compiled or eager decode, the CUDA
paged decode kernel on or off, and the one-step look-ahead on or off; each engine fresh.
Part 2: the KV cache write alone (one token into every layer's K and V pools, as a decode
step does) for the same pool sizes: a write that copies the pool instead of scattering
into it in place shows here as time growing with the pool.

    python benchmarks/decode_probe.py --model tests/.fixtures/llama3-8b-q4 --dtype float16
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time

import numpy as np

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx import LLM
from nanovllm_mlx.attention import cuda
from nanovllm_mlx.attention.metadata import KVCache, PoolLayout
from nanovllm_mlx.bench import single_stream
from nanovllm_mlx.engine.runner import step_inputs
from nanovllm_mlx.models import cuda_qmv


def engine_grid(args: argparse.Namespace) -> None:
    contexts = [int(c) for c in args.contexts.split(",")]
    print(
        f"{'pool GB':>8} {'compiled':>8} {'kernel':>6} {'ahead':>6} "
        + " ".join(f"{f'after {c}':>12}" for c in contexts)
    )
    for config in args.configs.split(","):
        pool_gb, compiled, kernel, ahead = config.split(":")
        pool = float(pool_gb)
        if kernel == "on" and not cuda.available():
            continue
        os.environ["NANOVLLM_PAGED_KERNEL"] = "1" if kernel == "on" else "0"
        cuda.available.cache_clear()
        llm = LLM(
            args.model,
            dtype=args.dtype,
            kv_cache_gb=pool,
            max_model_len=max(contexts) + args.decode_tokens + 16,
            compile_decode=compiled == "on",
            async_scheduling=ahead == "on",
            kv_cache_dtype=args.kv_cache_dtype,
            **({"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}),
        )
        vocab = llm.engine.vocab_size
        cells = []
        for salt, length in enumerate(contexts):
            single_stream(llm, [(i * 31 + salt) % vocab for i in range(length)], 8)  # warm
            rates = [
                single_stream(
                    llm,
                    [
                        (i * 7919 + 104729 * (salt * 10 + r + 1)) % min(vocab, 10_000)
                        for i in range(length)
                    ],
                    args.decode_tokens,
                )[1]
                for r in range(args.repeats)
            ]
            cells.append(statistics.median(rates))
        backend = llm.engine.model_runner.backend.name
        print(
            f"{pool:8.1f} {compiled:>8} {kernel:>6} {ahead:>6} "
            + " ".join(f"{c:12.1f}" for c in cells)
            + f"   ({backend})",
            flush=True,
        )
        del llm
        gc.collect()
        mx.clear_cache()
    os.environ.pop("NANOVLLM_PAGED_KERNEL")
    cuda.available.cache_clear()


def write_probe(args: argparse.Namespace) -> None:
    dtype = getattr(mx, args.dtype)
    layers, hkv, d, bs = args.layers, args.kv_heads, args.head_dim, 16
    print(f"\nKV write of one token into {layers} layers' K and V pools ({hkv} x {d}, {dtype})")
    for pool_gb in [float(p) for p in args.pools.split(",")]:
        per_token = 2 * layers * hkv * d * dtype.size
        blocks = int(pool_gb * 2**30 / per_token / bs)
        layout = PoolLayout(hkv, blocks, bs)
        caches = [
            KVCache(
                mx.zeros((hkv, blocks * bs, d), dtype), mx.zeros((hkv, blocks * bs, d), dtype), bs
            )
            for _ in range(layers)
        ]
        mx.eval([(c.k, c.v) for c in caches])
        new = mx.random.normal((1, hkv, d)).astype(dtype)
        times = []
        for step in range(30):
            rows = layout.write_rows(np.array([step * 7919 % (blocks * bs)]))
            t0 = time.perf_counter()
            for c in caches:
                c.write(new, new, rows)
            mx.eval([(c.k, c.v) for c in caches])
            times.append(time.perf_counter() - t0)
        print(f"  pool {pool_gb:5.1f} GB: {1e3 * statistics.median(times[5:]):.3f} ms a step")
        del caches
        gc.collect()
        mx.clear_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--pools", default="2.5,20", help="part 2's pool sizes (GB), empty: none")
    ap.add_argument(
        "--configs",
        default="2.5:on:on:on,20:on:on:on,20:off:on:on,20:on:off:on,20:off:off:on,20:on:on:off",
        help="part 1's engines, pool GB:compiled:kernel:look-ahead, comma-separated",
    )
    ap.add_argument("--contexts", default="32,8192")
    ap.add_argument("--kv-cache-dtype", default="auto", help="part 1's pools: auto, int8, ...")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=0,
        help="the engine's (default: its own); 1 also limits the start-up warm-up to one row",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32, help="part 2's model shape")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument(
        "--qmv-tiling",
        default="",
        help="R,U: our 4-bit product's weight rows a warp and steps in flight for every "
        "layer (models/cuda_qmv.py; default: its own choice)",
    )
    ap.add_argument(
        "--min-decode-rows",
        type=int,
        default=0,
        help="pad compiled decode steps to at least this many rows (8: MLX's CUDA build "
        "takes its tiled 4-bit matmul from 8 rows; block tables widen alike, harmlessly)",
    )
    ap.add_argument(
        "--target-blocks",
        type=int,
        default=0,
        help="thread blocks the paged decode kernel aims a step's partitions at (default: "
        "attention/cuda.py's TARGET_BLOCKS, 512): more, shorter partitions at long context",
    )
    args = ap.parse_args()
    if args.target_blocks:
        cuda.paged_decode = functools.partial(cuda.paged_decode, target_blocks=args.target_blocks)
    if args.min_decode_rows:
        bucket = step_inputs.bucket
        step_inputs.bucket = lambda n: max(bucket(n), args.min_decode_rows)
    if args.qmv_tiling:
        per_warp, cuda_qmv.STEPS_IN_FLIGHT = map(int, args.qmv_tiling.split(","))
        cuda_qmv.rows_per_warp = lambda n_out, n_rows=1: per_warp
    print(nanovllm_mlx.backend.describe())
    if not args.skip_engine:
        engine_grid(args)
    if args.pools:
        write_probe(args)


if __name__ == "__main__":
    main()
