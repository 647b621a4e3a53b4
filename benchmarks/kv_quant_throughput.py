"""Batched throughput at one fixed KV-cache budget, per --kv-cache-dtype, side by side in
one run (issue 26): a quantized pool holds more tokens, so more sequences run at once and
fewer are preempted.

    python benchmarks/kv_quant_throughput.py                     # the default model
    python benchmarks/kv_quant_throughput.py --kv-cache-gb 0.1 --rounds 2

Each round runs every dtype once, in turn, on the same workload (nano-vllm's random-prompt
workload, EOS ignored, greedy); the table gives each dtype's median over rounds and its
ratio to the compute-dtype pool (auto: float32 on a CPU, where MLX computes in float32).
"""

from __future__ import annotations

import argparse
import json
import statistics

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx import LLM
from nanovllm_mlx.bench import make_workload, run_benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", default=None, help="default: the engine's default model")
    ap.add_argument("--kv-cache-gb", type=float, default=0.1)
    ap.add_argument("--dtypes", default="auto,float16,int8,int4")
    ap.add_argument("--num-seqs", type=int, default=32)
    ap.add_argument("--input", type=int, default=128, help="prompt tokens, each request")
    ap.add_argument("--output", type=int, default=128, help="output tokens, each request")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    dtypes = args.dtypes.split(",")
    workload = make_workload(
        args.num_seqs, args.input, args.input, args.output, args.output, seed=0
    )
    engines = {
        d: LLM(
            args.model,
            kv_cache_dtype=d,
            kv_cache_gb=args.kv_cache_gb,
            max_num_seqs=64,
            max_model_len=args.input + args.output,
        )
        for d in dtypes
    }
    runs: dict[str, list[dict]] = {d: [] for d in dtypes}
    for _ in range(args.rounds):
        for d, llm in engines.items():
            # All engines live in this process: what a run adds on top of them is its own
            # (activations, gathered and dequantized blocks), the pools included in none.
            active = mx.get_active_memory() / 1e9
            result = run_benchmark(llm, workload, temperature=0.0)
            result["transient_gb"] = result["peak_memory_gb"] - active
            runs[d].append(result)
    base = statistics.median(r["throughput"] for r in runs[dtypes[0]])
    print(
        f"\n{args.num_seqs} requests x ({args.input} prompt + {args.output} output) tokens, "
        f"--kv-cache-gb {args.kv_cache_gb}, median of {args.rounds} round(s)\n"
    )
    print("| KV dtype | tokens that fit | peak batch | preemptions | output tok/s | vs "
          f"{dtypes[0]} | wall s | peak above resident, GB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d, llm in engines.items():
        stats = llm.stats()
        tps = statistics.median(r["throughput"] for r in runs[d])
        secs = statistics.median(r["seconds"] for r in runs[d])
        transient = max(r["transient_gb"] for r in runs[d])
        print(
            f"| {stats['kv_cache_dtype']} | {stats['kv_cache_tokens']:,} | "
            f"{stats['peak_batch_size']} | {stats['preemptions']} | {tps:.1f} | "
            f"{tps / base:.2f}x | {secs:.1f} | {transient:.3f} |"
        )
    print(json.dumps({d: [r["throughput"] for r in rs] for d, rs in runs.items()}))


if __name__ == "__main__":
    main()
