"""Prefix caching for a hybrid model (Qwen3.5): the second turn of a chat with the
restored recurrent state, against a prompt of the same length computed from scratch.

Each round, on one engine: turn 1 answers a fresh prompt, turn 2 sends the prompt, the
answer and a short follow-up (its prefix restored from the snapshot its answer left), then
a fresh prompt as long as turn 2 (nothing cached) runs as the control. Reported: the
median time to first token of each, their ratio, and the tokens each took from the cache.
(tests/test_hybrid.py checks that restored states give the recomputed tokens.)

    python tests/make_fixtures.py qwen35-medium-shape
    python benchmarks/hybrid_prefix.py --model tests/.fixtures/qwen35-medium-shape
"""

from __future__ import annotations

import argparse
import statistics
import time

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
# isort: on

import numpy as np

from nanovllm_mlx import LLM, SamplingParams


def first_token_s(llm: LLM, prompt: list[int]) -> tuple[float, int, list[int]]:
    """Time to the first token of one greedy request, its cached tokens, its tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = llm.engine
    t0 = time.perf_counter()
    request = engine.add_request(prompt, params)
    first, cached, tokens = None, 0, []
    for outputs in engine.iterate([request]):
        for out in outputs:
            if first is None and out.token_ids:
                first = time.perf_counter() - t0
            cached = out.num_cached_tokens
            tokens += out.token_ids
    assert first is not None
    return first, cached, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--answer-tokens", type=int, default=100)
    ap.add_argument("--follow-up", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    # One engine (the ~0.6B float32 shape is 2.4 GB), a fixed step budget so that both
    # prompts are cut alike, a small KV pool and context.
    llm = LLM(
        args.model, max_num_seqs=4, kv_cache_gb=0.1, max_model_len=2048,
        max_num_batched_tokens=512,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    ttft: dict[str, list[float]] = {"restored": [], "recomputed": []}
    cached: dict[str, list[int]] = {"restored": [], "recomputed": []}
    answer_params = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens, ignore_eos=True)
    turn = args.prompt_tokens + args.answer_tokens + args.follow_up
    for _ in range(args.rounds):
        prompt = rng.integers(0, 50000, args.prompt_tokens).tolist()
        follow = rng.integers(0, 50000, args.follow_up).tolist()
        answer = llm.generate([prompt], answer_params)[0]["token_ids"]
        prompts = {
            "restored": prompt + answer + follow,
            "recomputed": rng.integers(0, 50000, turn).tolist(),
        }
        for name, ids in prompts.items():
            seconds, hit, _ = first_token_s(llm, ids)
            ttft[name].append(seconds)
            cached[name].append(hit)
    print(f"model {args.model}, turn 2: {turn} tokens, {args.rounds} rounds")
    for name in ttft:
        print(
            f"  {name:>10}: TTFT median {statistics.median(ttft[name]):.3f} s "
            f"(all {', '.join(f'{t:.3f}' for t in ttft[name])}), cached {cached[name]}"
        )
    ratio = statistics.median(ttft["recomputed"]) / statistics.median(ttft["restored"])
    print(f"  restored state: {ratio:.1f}x faster to the first token")


if __name__ == "__main__":
    main()
