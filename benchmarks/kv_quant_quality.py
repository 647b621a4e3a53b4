"""Quantized KV cache quality and capacity (issue 26), on real models, one model at a time.

    python benchmarks/kv_quant_quality.py                      # both models, the shipped formats
    python benchmarks/kv_quant_quality.py --study              # the candidate formats too

For each model and --kv-cache-dtype it reports:
- tokens that fit at a fixed --kv-cache-gb (the engine's own count, stats()["kv_cache_tokens"]),
  and the ratio to a float16 pool;
- the twelve capitals prompts of demo_capitals.sh as one batch, greedy, as the demo runs
  them (12 tokens at most, cut at EOS, "." or a newline): how many answers are the
  reference's tokens exactly, and how many name the capital; and, stricter, how many give
  the reference's 12 tokens when EOS and stops are ignored;
- the mean (and largest) absolute difference of each token's logprob over the first
  1,000 tokens of a fixed English text (Python's own LICENSE.txt history), teacher-forced
  through prompt_logprobs, so every read is of the quantized pool.

The reference is the unquantized cache in the compute dtype: on this CPU that is float32
(`auto`), not float16; a float16 pool is measured beside it. --study swaps other formats
in under the same names (int8/int4) for the measurement only, to justify the shipped ones
(attention/kv_quant.py).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention import kv_quant
from nanovllm_mlx.attention.kv_quant import KVFormat

MODELS = ["models/SmolLM2-135M-Instruct-Q4_1", "models/gemma-3-270m-Q4_K_M"]
COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Russia": "Moscow", "Canada": "Ottawa", "China": "Beijing",
    "Greece": "Athens", "Egypt": "Cairo", "Australia": "Canberra", "Kenya": "Nairobi",
}  # fmt: skip
TEXT_TOKENS = 1000
KV_GB = 0.25
# name -> (--kv-cache-dtype it runs under, the format swapped in for it)
STUDY: dict[str, tuple[str, KVFormat]] = {
    "int8 sym/row": ("int8", KVFormat("int8", bits=8)),
    "int8 affine/64": ("int8", KVFormat("int8", bits=8, group=64, affine=True)),
    "int4 affine/64": ("int4", KVFormat("int4", bits=4, group=64, affine=True)),
    "int4 affine/32": ("int4", KVFormat("int4", bits=4, group=32, affine=True)),
    "int4 sym/row": ("int4", KVFormat("int4", bits=4)),
    "int4 sym/32": ("int4", KVFormat("int4", bits=4, group=32)),
    "int8 sym/row + Hadamard (shipped)": ("int8", kv_quant.INT8),
    "int4 affine/64 + Hadamard (shipped)": ("int4", kv_quant.INT4),
    "int4 sym/row + Hadamard": ("int4", KVFormat("int4", bits=4, rotate=True)),
}


def text_tokens(llm: LLM) -> list[int]:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.exists():
        path = Path(sys.base_prefix) / "LICENSE.txt"
    ids = llm.engine.tokenizer.encode(path.read_text(), add_special_tokens=True)
    if len(ids) < TEXT_TOKENS:
        raise SystemExit(f"{path} has only {len(ids)} tokens")
    return ids[:TEXT_TOKENS]


def measure(model: str, kv_dtype: str, skip_logprobs: bool = False) -> dict:
    llm = LLM(model, kv_cache_dtype=kv_dtype, kv_cache_gb=KV_GB, max_model_len=2048)
    prompts = [f"The capital city of {c} is" for c in COUNTRIES]
    demo = SamplingParams(temperature=0.0, max_tokens=12, stop=[".", "\n"])
    answers = llm.generate(prompts, demo)
    twelve = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    logprobs = [0.0] * (TEXT_TOKENS - 1)
    if not skip_logprobs:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        scored = llm.generate([text_tokens(llm)], params)
        logprobs = [next(iter(d.values())) for d in scored[0]["prompt_logprobs"][1:]]
    stats = llm.stats()
    llm.engine.close()
    return {
        "tokens": [a["token_ids"] for a in answers],
        "twelve": [a["token_ids"] for a in twelve],
        "correct": sum(cap in a["text"] for a, cap in zip(answers, COUNTRIES.values())),
        "logprobs": logprobs,
        "kv_tokens": stats["kv_cache_tokens"],
        "name": stats["kv_cache_dtype"],
    }


def report(model: str, runs: dict[str, dict]) -> None:
    ref = runs["auto"]
    f16 = runs["float16"]["kv_tokens"]
    print(f"\n### {Path(model).name} (reference: auto = {ref['name']}; --kv-cache-gb {KV_GB})\n")
    print("| KV dtype | tokens that fit | vs float16 | capitals: same answer tokens "
          "| capitals right | same 12 tokens, EOS ignored | mean abs Δlogprob "
          "| max abs Δlogprob |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in runs.items():
        same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
        same12 = sum(a == b for a, b in zip(r["twelve"], ref["twelve"]))
        diffs = [abs(a - b) for a, b in zip(r["logprobs"], ref["logprobs"])]
        print(
            f"| {label} | {r['kv_tokens']:,} | {r['kv_tokens'] / f16:.2f}x | "
            f"{same}/{len(COUNTRIES)} | {r['correct']}/{len(COUNTRIES)} | "
            f"{same12}/{len(COUNTRIES)} | "
            f"{sum(diffs) / len(diffs):.4f} | {max(diffs):.3f} |"
        )
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", action="append", help=f"repeatable; default: {MODELS}")
    ap.add_argument("--study", action="store_true", help="also measure candidate formats")
    ap.add_argument("--skip-logprobs", action="store_true", help="capitals and capacity only")
    args = ap.parse_args()
    skip = args.skip_logprobs

    def measure_one(model: str, name: str) -> dict:
        return measure(model, name, skip)

    for model in args.model or MODELS:
        runs = {name: measure_one(model, name) for name in ("auto", "float16", "bfloat16")}
        if args.study:
            shipped = dict(kv_quant.QUANTIZED)
            for label, (name, fmt) in STUDY.items():
                kv_quant.QUANTIZED[name] = fmt
                try:
                    runs[label] = measure_one(model, name)
                finally:
                    kv_quant.QUANTIZED.update(shipped)
        else:
            runs.update({name: measure_one(model, name) for name in ("int8", "int4")})
        report(model, runs)


if __name__ == "__main__":
    main()
