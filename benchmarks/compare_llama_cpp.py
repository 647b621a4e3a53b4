"""nanovllm-mlx vs llama.cpp (llama-cpp-python) on one GGUF, one stream, side by side.

Alternates the engines (ours dequantized, as the CPU default; ours kept quantized;
llama.cpp) over the same chat prompt, greedy, the same number of tokens, and prints the
medians of prompt tok/s (time to first token) and decode tok/s. llama.cpp runs with as
many threads as the machine has cores, as it would by default on a laptop.

    pip install llama-cpp-python   # builds llama.cpp from source
    python benchmarks/compare_llama_cpp.py                     # the default model
    python benchmarks/compare_llama_cpp.py --model path/to/model.gguf --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
# isort: on

from nanovllm_mlx import LLM
from nanovllm_mlx.bench import single_stream
from nanovllm_mlx.loading import download

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def theirs(model, prompt: list[int], tokens: int) -> tuple[float, float]:
    model.reset()  # no prompt cache between rounds: the same work as ours
    start = time.perf_counter()
    first, n = None, 0
    for _ in model.generate(prompt, temp=0.0, top_k=1, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == tokens:
            break
    return first - start, (n - 1) / (time.perf_counter() - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf (default: the default model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from llama_cpp import Llama

    path = args.model or str(download.fetch_default())
    engines = {
        "ours (dequantized)": LLM(path, max_model_len=2048, enable_prefix_caching=False),
        "ours (kept quantized)": LLM(
            path, max_model_len=2048, enable_prefix_caching=False, keep_quantized=True
        ),
    }
    threads = os.cpu_count() or 1
    cpp = Llama(path, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    prompt = engines["ours (dequantized)"].tokenizer.encode_chat(
        [{"role": "user", "content": PROMPT}]
    )
    # The same token ids for both: llama.cpp's own tokenizer might split otherwise.
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in [*engines, "llama.cpp"]}
    for llm in engines.values():
        single_stream(llm, prompt, 4)  # warm-up
    theirs(cpp, prompt, 4)
    for r in range(args.repeats):
        for name, llm in engines.items():
            runs[name].append(single_stream(llm, prompt, args.tokens))
        runs["llama.cpp"].append(theirs(cpp, prompt, args.tokens))
        cells = ", ".join(f"{k} {v[-1][1]:.1f} tok/s" for k, v in runs.items())
        print(f"round {r + 1}: {cells}", flush=True)
    setup = f"{len(prompt)}-token prompt, {args.tokens} tokens, llama.cpp {threads} threads"
    print(f"\n{path}, {setup}")
    print(f"{'engine':24} {'TTFT s':>8} {'prompt tok/s':>13} {'decode tok/s':>13}")
    summary = {}
    for name, values in runs.items():
        ttft = statistics.median(v[0] for v in values)
        decode = statistics.median(v[1] for v in values)
        summary[name] = {
            "ttft_s": ttft,
            "prompt_tok_s": len(prompt) / ttft,
            "decode_tok_s": decode,
        }
        print(f"{name:24} {ttft:8.3f} {len(prompt) / ttft:13.1f} {decode:13.1f}")
    if args.json:
        print(json.dumps({"model": path, "prompt_tokens": len(prompt), "engines": summary}))


if __name__ == "__main__":
    main()
