"""How far our few-row 4-bit product (models/cuda_qmv.py) moves an engine's decode
logprobs, against how far MLX's own decode is from its prefill (the floor).

Greedy decode of one prompt alone and of three at once (one and three rows a product),
with the kernel; each chosen token's logprob against the same token read by the MLX path
as part of a prompt (teacher-forced, so a diverging greedy path does not matter). Then
the same for the MLX path's own decode (its one-row kernel against its tiled matmul), and
with --float32 both against a float32 engine's prefill (which decode is nearer the truth).

    python benchmarks/qmv_logprobs.py --model tests/.fixtures/llama3-8b-q4
"""

from __future__ import annotations

import argparse
import os

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import numpy as np

# isort: on
from nanovllm_mlx import LLM, SamplingParams


def forced_logprobs(llm: LLM, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Each of tokens' logprob after prompt and the tokens before it, from one prefill."""
    teacher = SamplingParams(max_tokens=1, prompt_logprobs=0)
    rows = llm.generate([prompt + tokens], teacher)[0]["prompt_logprobs"][len(prompt) :]
    return np.array([row[token] for row, token in zip(rows, tokens)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument(
        "--float32", action="store_true", help="also against a float32 engine's prefill"
    )
    args = ap.parse_args()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (7, 19, 33)]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True, logprobs=True)
    engine = {"dtype": args.dtype, "kv_cache_gb": 2, "max_model_len": 4096}
    os.environ["NANOVLLM_CUDA_QMV"] = "1"
    llm = LLM(args.model, **engine)
    kinds = {type(m).__name__ for _, m in llm.engine.model_runner.model.named_modules()}
    print("our kernel's layers:", "FewRowsQuantizedLinear" in kinds)
    ours = [llm.generate([prompts[0]], greedy)[0], *llm.generate(prompts, greedy)[1:]]
    del llm
    os.environ["NANOVLLM_CUDA_QMV"] = "0"
    ref = LLM(args.model, **engine)
    floor = [ref.generate([p], greedy)[0] for p in prompts]
    runs = (("ours", ours), ("floor", floor))
    report(runs, prompts, ref, "MLX prefill")
    if args.float32:
        # Against float32 compute (MLX's products, same 4-bit weights): which decode is
        # nearer the truth, rather than nearer MLX's own float16 prefill.
        del ref
        report(runs, prompts, LLM(args.model, **{**engine, "dtype": "float32"}), "float32")


def report(runs: tuple, prompts: list[list[int]], judge: LLM, judge_name: str) -> None:
    """Each run's decode logprobs against judge's teacher-forced ones, prompt by prompt."""
    for name, outs in runs:
        for prompt, out in zip(prompts, outs):
            forced = forced_logprobs(judge, prompt, out["token_ids"])
            diff = np.abs(np.array(out["logprobs"]) - forced)
            print(
                f"{name:>5}, {len(prompt)}-token prompt: |decode - {judge_name}| logprob "
                f"max {diff.max():.4f} mean {diff.mean():.4f}"
            )


if __name__ == "__main__":
    main()
