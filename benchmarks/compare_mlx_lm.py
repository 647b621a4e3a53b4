"""nanovllm-mlx vs mlx-lm, side by side on one model, one machine, one run.

Runs each figure alternately (ours, theirs, ours, theirs, ...) and prints medians and the
ratio ours / mlx-lm:
  - the first request after loading: its decode tok/s, before anything warmed either up
  - single-stream decode tok/s (greedy, --decode-tokens tokens) after a prompt of each of
    --contexts tokens
  - time to first token for a prompt of each of --ttft tokens
  - batched output tok/s for the nano-vllm workload at each --batches size (random prompt
    and output lengths, EOS ignored by both engines)

Fair by construction: both engines are warmed up the same way, MLX's buffer cache is
emptied (mx.clear_cache) each time the other engine takes over, and mlx-lm's
batch_generate may decode as many sequences at once as we do (completion_batch_size =
min(requests, --max-num-seqs)) and prefill --mlx-lm-prefill-batch prompts at once (default
min(requests, --max-num-seqs); at 8B and 2k-token prompts 32 of them at once do not fit in
80 GB, so such runs set 8, mlx-lm's own default, and the output says so). Every prompt is
new to our prefix cache. The single-stream figures are also given as a share of the
weight-bandwidth bound (device bandwidth, measured in the same run, over the bytes of
weights a decode step reads).

    python benchmarks/compare_mlx_lm.py --model tests/.fixtures/gpt2-small-shape
    python benchmarks/compare_mlx_lm.py --model M --dtype float16 --batches 8,32,128
    python benchmarks/compare_mlx_lm.py --model tests/.fixtures/llama3-8b-q4 --dtype float16 \
        --contexts 32,2048,8192,32768 --ttft 4096,16384 --batches 8,64 --min-input 256 \
        --max-input 2048 --min-output 128 --max-output 256 --mlx-lm-prefill-batch 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx import LLM
from nanovllm_mlx.bench import fit_workload, make_workload, run_benchmark, single_stream

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# ours -------------------------------------------------------------------------------------


def ours_batch(llm: LLM, workload) -> float:
    run = run_benchmark(llm, workload, temperature=0.0, warmup=False)
    # Where our time went (v15: 8 requests took ~7 s where the weights' reads alone allow
    # ~3): steps that computed prompt tokens, and decode-only steps.
    print(
        f"  ours: {run['steps']} steps, mean batch {run['mean_batch_size']:.1f}; prefill "
        f"{run['prefill_seconds']:.2f} s at {run['prefill_throughput']:.0f} tok/s, decode "
        f"{run['decode_seconds']:.2f} s at {run['decode_throughput']:.0f} tok/s",
        flush=True,
    )
    return float(run["throughput"])


# mlx-lm -----------------------------------------------------------------------------------


def theirs_single(model, tokenizer, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    first = None
    n = 0
    for _ in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)
    ):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (n - 1) / (end - first)


def theirs_batch(model, tokenizer, workload, max_batch: int, prefill_batch: int | None) -> float:
    from mlx_lm import batch_generate

    prompts = [ids for ids, _ in workload]
    max_tokens = [n for _, n in workload]
    batch = min(len(prompts), max_batch)
    start = time.perf_counter()
    result = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=max_tokens,
        return_token_ids=True,
        completion_batch_size=batch,
        prefill_batch_size=min(batch, prefill_batch or batch),
    )
    seconds = time.perf_counter() - start
    return sum(len(ids) for ids in result.token_ids) / seconds


# the bound ------------------------------------------------------------------------------


def device_bandwidth(gigabytes: float = 1.0) -> float:
    """Bytes/s the device demonstrably reads: the better of a large elementwise op (read +
    write) and a matrix-vector product over a large matrix (decode's own access pattern),
    medians of 5. On CPU the elementwise op alone said 5 GB/s (one thread, and its output
    page-faulted in), below what decode itself reads through the BLAS's threads."""

    def timed(fn, moved: int) -> float:
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t0)
        return moved / statistics.median(times[1:])

    n = int(gigabytes * 2**30) // 4
    x = mx.zeros((n,), dtype=mx.float32)
    w, v = mx.zeros((n // 4096, 4096), dtype=mx.float32), mx.zeros((4096,), dtype=mx.float32)
    mx.eval(x, w, v)
    return max(timed(lambda: x + 1, 2 * x.nbytes), timed(lambda: w @ v, w.nbytes))


def weight_bytes_per_token(llm: LLM) -> int:
    """What one decode step must read: every weight once (an embedding lookup reads one
    row, but a tied head reads the whole matrix, so counting it once is right)."""
    from mlx.utils import tree_flatten

    return sum(p.nbytes for _, p in tree_flatten(llm.engine.model_runner.model.parameters()))


# driver -----------------------------------------------------------------------------------


def prompt_of(length: int, salt: int, vocab: int) -> list[int]:
    """A deterministic prompt; a new salt shares no block with earlier prompts."""
    return [(i * 7919 + salt * 104729) % min(vocab, 10_000) for i in range(1, length + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-layout model directory")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per figure")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--contexts", default="32", help="prompt lengths before decode tok/s")
    ap.add_argument("--ttft", default="512", help="prompt lengths whose TTFT is measured")
    ap.add_argument("--batches", default="8,32,128,256")
    ap.add_argument("--batch-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--min-input", type=int, default=100)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--min-output", type=int, default=100)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--mlx-lm-prefill-batch", type=int, default=None)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="ours; default: the engine's")
    ap.add_argument("--max-model-len", type=int, default=None, help="ours; default: the model's")
    ap.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="ours (auto|float16|bfloat16|int8|int4): mlx-lm keeps its float cache, so a "
        "quantized run is our int8/int4 against its float16, said in the output",
    )
    ap.add_argument(
        "--async-scheduling",
        choices=["auto", "on", "off"],
        default="auto",
        help="launch decode steps one ahead (auto: on GPUs only)",
    )
    ap.add_argument(
        "--compile-decode",
        choices=["auto", "on", "off"],
        default="auto",
        help="run decode steps through mx.compile (auto: on GPUs only)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = ap.parse_args()

    from mlx_lm import load

    contexts = [int(c) for c in args.contexts.split(",") if c]
    ttfts = [int(c) for c in args.ttft.split(",") if c]
    choice = {"auto": None, "on": True, "off": False}
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        kv_cache_gb=args.kv_cache_gb,
        kv_cache_dtype=args.kv_cache_dtype,
        async_scheduling=choice[args.async_scheduling],
        compile_decode=choice[args.compile_decode],
    )
    ours_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = load(args.model)
    model.set_dtype(DTYPES[args.dtype])
    theirs_load = time.perf_counter() - t0
    tokenizer.eos_token_ids = []  # both engines ignore EOS, as in nano-vllm's bench
    vocab = llm.engine.vocab_size

    results: dict[str, dict[str, list[float]]] = {}

    def record(figure: str, ours: float, theirs: float) -> None:
        entry = results.setdefault(figure, {"ours": [], "mlx_lm": []})
        entry["ours"].append(ours)
        entry["mlx_lm"].append(theirs)
        print(f"  {figure}: ours {ours:.3f}  mlx-lm {theirs:.3f}", flush=True)

    def both_single(prompt: list[int], tokens: int) -> tuple[tuple[float, float], ...]:
        ours = single_stream(llm, prompt, tokens)
        mx.clear_cache()
        theirs = theirs_single(model, tokenizer, prompt, tokens)
        mx.clear_cache()
        return ours, theirs

    record("load s", ours_load, theirs_load)
    # The first request after loading, before any warm-up: what a user's first answer gets.
    first = both_single(prompt_of(32, 0, vocab), args.decode_tokens)
    record("decode tok/s (first request)", first[0][1], first[1][1])
    # Warm both up (kernel compilation, allocator) before anything else is timed.
    for length in (32, min(2048, max(contexts + ttfts))):
        both_single(prompt_of(length, 1, vocab), 8)
    warm_batch = make_workload(8, 16, 64, 8, 16, seed=99, vocab_size=vocab)
    ours_batch(llm, warm_batch)
    theirs_batch(model, tokenizer, warm_batch, args.max_num_seqs, args.mlx_lm_prefill_batch)
    mx.clear_cache()
    salt = 2
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        for length in contexts:
            salt += 1
            ours, theirs = both_single(prompt_of(length, salt, vocab), args.decode_tokens)
            record(f"decode tok/s (1 stream, {length}-token prompt)", ours[1], theirs[1])
        for length in ttfts:
            salt += 1
            ours, theirs = both_single(prompt_of(length, salt, vocab), 2)
            record(f"TTFT s ({length}-token prompt)", ours[0], theirs[0])

    for size in [int(b) for b in args.batches.split(",") if b]:
        for r in range(args.batch_repeats or args.repeats):
            workload = make_workload(
                size,
                args.min_input,
                args.max_input,
                args.min_output,
                args.max_output,
                seed=r,
                vocab_size=vocab,
            )
            # Both engines get the same requests, cut to fit the model's context.
            workload, _ = fit_workload(workload, llm.engine.max_model_len)
            print(f"batch {size}, round {r + 1}", flush=True)
            ours = ours_batch(llm, workload)
            mx.clear_cache()
            try:
                theirs = theirs_batch(
                    model, tokenizer, workload, args.max_num_seqs, args.mlx_lm_prefill_batch
                )
            except RuntimeError as e:
                # v15's MoE row: mlx-lm's batched prefill died inside MLX's CUDA graph
                # (cuGraphAddKernelNode: invalid argument), which took our figure with it.
                print(f"  mlx-lm failed: {e}", flush=True)
                theirs = float("nan")
            mx.clear_cache()
            record(f"output tok/s ({size} requests)", ours, theirs)

    bandwidth = device_bandwidth()
    weights = weight_bytes_per_token(llm)
    bound = bandwidth / weights
    print()
    print(f"model {args.model}, dtype {args.dtype}, {nanovllm_mlx.backend.describe()}")
    print(
        f"mlx-lm batches: completion_batch_size = min(requests, {args.max_num_seqs}), "
        f"prefill_batch_size = min(requests, {args.mlx_lm_prefill_batch or args.max_num_seqs}); "
        f"ours: max_num_seqs {args.max_num_seqs}, "
        f"{llm.engine.max_num_batched_tokens} tokens a step, "
        f"{llm.engine.model_runner.pool.num_blocks} KV blocks of "
        f"{llm.engine.model_runner.pool.block_size}, decode "
        f"{'compiled' if llm.stats()['compile_decode'] else 'eager'} "
        f"(start-up timing, compiled/eager ms: {llm.engine.model_runner.compile_ms}), "
        f"start-up phases (s): "
        f"{ {k: round(v, 2) for k, v in llm.engine.startup_s.items()} }, "
        f"attention {llm.engine.model_runner.backend.name}, "
        f"KV cache {llm.stats()['kv_cache_dtype']} (mlx-lm's: the model's dtype); "
        f"both engines run in this process with MLX_MAX_MB_PER_BUFFER="
        f"{os.environ.get('MLX_MAX_MB_PER_BUFFER', 'unset')}"
    )
    print(
        f"bandwidth {bandwidth / 1e9:.0f} GB/s, weights {weights / 1e6:.0f} MB a token: "
        f"single-stream bound {bound:,.0f} tok/s"
    )
    print(f"{'figure':42} {'ours':>10} {'mlx-lm':>10} {'ratio':>7}")
    summary = {}
    for figure, entry in results.items():
        # A failed mlx-lm round is NaN (theirs_batch): the median of the rounds that ran.
        ran = [x for x in entry["mlx_lm"] if not math.isnan(x)] or [math.nan]
        ours, theirs = statistics.median(entry["ours"]), statistics.median(ran)
        # For TTFT lower is better: report the speed-up the same way round as the others.
        lower_better = figure.startswith(("TTFT", "load"))
        ratio = theirs / ours if lower_better else ours / theirs
        summary[figure] = {"ours": ours, "mlx_lm": theirs, "ratio": ratio, "runs": entry}
        share = ""
        if figure.startswith("decode"):
            share = f"   ({ours / bound:.1%} / {theirs / bound:.1%} of the bound)"
        print(f"{figure:42} {ours:10.3f} {theirs:10.3f} {ratio:6.2f}x{share}")
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "dtype": args.dtype,
                    "bandwidth_gb_s": bandwidth / 1e9,
                    "weight_bytes": weights,
                    "single_stream_bound_tok_s": bound,
                    "figures": summary,
                }
            )
        )


if __name__ == "__main__":
    main()
