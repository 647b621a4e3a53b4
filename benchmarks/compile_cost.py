"""What the compiled decode step costs and saves, per largest compiled batch.

For each setting (eager, and compiled with COMPILE_MAX_BATCH = each of --max-batches) one
engine runs the same-shaped workload twice: cold (every decode bucket it meets is traced
on first use) and warm (the same lengths, other tokens: no prefix-cache hit, no new
bucket). cold - warm, less the same difference eager (first-use kernels and allocation,
paid by both), is what the traces cost; warm compiled against warm eager is what
compiling saves once traced. On CUDA, MLX builds a compiled graph's fused kernels on first
use and caches them in the process and on disk (/tmp/mlx/<version>/ptx), so the kernel
build shows only in the first compiled setting of a run on a fresh cache (481 ms a bucket
on an H200, benchmarks/logs/h200_compile_cost_gpt2_small_f16_v7.log); the later settings
measure tracing alone.

    python benchmarks/compile_cost.py --model tests/.fixtures/gpt2-small-shape \\
        --dtype float16 --requests 8,32
"""

from __future__ import annotations

import argparse

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
# isort: on

from nanovllm_mlx import LLM
from nanovllm_mlx.bench import make_workload, run_benchmark
from nanovllm_mlx.engine.runner import compiled_decode


def shifted(workload: list, vocab: int) -> list:
    return [([(t + 1) % vocab for t in ids], n) for ids, n in workload]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--requests", default="8,32")
    ap.add_argument("--max-batches", default="8,32,256", help="COMPILE_MAX_BATCH values")
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=512)
    args = ap.parse_args()

    settings = [("eager", None)] + [(f"compiled<={b}", int(b)) for b in args.max_batches.split(",")]
    print(
        f"{'requests':>8} {'setting':>14} {'cold s':>8} {'warm s':>8} {'traces':>6} "
        f"{'ms/trace':>8} {'warm decode tok/s':>17} {'warm tok/s':>10}"
    )
    for n in [int(r) for r in args.requests.split(",")]:
        for name, max_batch in settings:
            if max_batch is not None:
                compiled_decode.COMPILE_MAX_BATCH = max_batch
            llm = LLM(
                args.model, dtype=args.dtype, max_num_seqs=256, compile_decode=max_batch is not None
            )
            vocab = llm.engine.vocab_size
            work = make_workload(
                n, args.min_len, args.max_len, args.min_len, args.max_len, seed=0, vocab_size=vocab
            )
            run_benchmark(llm, [], temperature=0.0)  # its warm-up: one short request
            before = len(llm.engine.model_runner.decode_buckets)
            cold = run_benchmark(llm, work, temperature=0.0, warmup=False)
            traced = len(llm.engine.model_runner.decode_buckets) - before
            warm = run_benchmark(llm, shifted(work, vocab), temperature=0.0, warmup=False)
            assert len(llm.engine.model_runner.decode_buckets) == before + traced  # none new
            extra = cold["seconds"] - warm["seconds"]
            if max_batch is None:
                eager_extra = extra  # first-use costs both settings pay (kernels, allocator)
            cost = (extra - eager_extra) / traced * 1e3 if traced else float("nan")
            print(
                f"{n:8d} {name:>14} {cold['seconds']:8.3f} {warm['seconds']:8.3f} {traced:6d} "
                f"{cost:8.1f} {warm['decode_throughput']:17.1f} {warm['throughput']:10.1f}",
                flush=True,
            )
            del llm


if __name__ == "__main__":
    main()
