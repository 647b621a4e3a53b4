"""nano-vllm's bench.py, on this engine: 256 requests with random prompts of 100-1024 tokens
and 100-1024 output tokens, EOS ignored, run as one continuous batch; prints output tok/s.

    python benchmarks/throughput.py --model tests/.fixtures/gpt2-small-shape
    python benchmarks/throughput.py --model M --num-seqs 64 --max-input 128 --max-output 128

`nanovllm bench` runs the same workload with a live dashboard; this script is the plain,
scriptable form, with the figures as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json

import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
from nanovllm_mlx import LLM
from nanovllm_mlx.bench import make_workload, run_benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", default=None, help="default: the engine's default model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-input", type=int, default=100)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--min-output", type=int, default=100)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    workload = make_workload(
        args.num_seqs,
        args.min_input,
        args.max_input,
        args.min_output,
        args.max_output,
        seed=args.seed,
        vocab_size=llm.engine.vocab_size,
    )
    result = run_benchmark(llm, workload, temperature=args.temperature)
    print(
        f"Total: {result['output_tokens']} tok, Time: {result['seconds']:.2f}s, "
        f"Throughput: {result['throughput']:.2f} tok/s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
