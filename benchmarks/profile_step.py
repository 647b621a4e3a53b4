"""Where an engine step's time goes, and what the paged attention read costs.

Part 1 times the host phases of every engine step (schedule, prepare, graph build, the
wait in mx.eval, postprocess + detokenize) for one greedy stream and for a batched
workload, split into decode-only steps and steps that prefill.
The attention read alone is in benchmarks/attention_layouts.py.

    python benchmarks/profile_step.py --model tests/.fixtures/gpt2-small-shape --dtype float16
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.bench import fit_workload, make_workload
from nanovllm_mlx.engine.runner import model_runner as mr

PHASES = ("schedule", "prepare", "build", "eval", "postprocess", "other")


def instrument(llm: LLM) -> dict[str, dict[str, float]]:
    """Wrap the engine's phases with timers; returns {step kind: {phase: seconds}}."""
    engine, runner = llm.engine, llm.engine.model_runner
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    current: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.scheduler.update = timed("postprocess", engine.scheduler.update)
    mr.prepare = timed("prepare", mr.prepare)
    runner.forward = timed("build", runner.forward)
    mr.sample = timed("build", mr.sample)
    real_eval = mx.eval
    mr.mx.eval = timed("eval", real_eval)
    step = engine._step  # the step every iterate() runs

    def profiled_step():
        current.clear()
        t0 = time.perf_counter()
        steps_before = engine.step_stats.steps
        out = step()
        total = time.perf_counter() - t0
        counters = engine.step_stats
        if counters.steps == steps_before:
            return out
        kind = "decode" if counters.last_batch_tokens == counters.last_batch_size else "prefill"
        bucket = totals[kind]
        for name, seconds in current.items():
            bucket[name] += seconds
        bucket["other"] += total - sum(current.values())
        bucket["steps"] += 1
        bucket["tokens"] += counters.last_batch_tokens
        return out

    engine._step = profiled_step
    return totals


def report(title: str, totals: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'kind':8} {'steps':>6} {'ms/step':>8}  " + "  ".join(f"{p:>11}" for p in PHASES))
    for kind, bucket in totals.items():
        steps = bucket["steps"]
        total = sum(bucket[p] for p in PHASES)
        cells = "  ".join(f"{1e3 * bucket[p] / steps:8.3f}ms" for p in PHASES)
        print(f"  {kind:8} {int(steps):6d} {1e3 * total / steps:8.3f}  {cells}")


def run_all(llm: LLM, requests: list[tuple[list[int], int]]) -> float:
    engine = llm.engine
    ids = engine.add_requests(
        [ids for ids, _ in requests],
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests],
    )
    t0 = time.perf_counter()
    for _ in engine.iterate(ids):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-input", type=int, default=100)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--min-output", type=int, default=100)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--compile-decode", choices=["auto", "on", "off"], default="auto")
    args = ap.parse_args()

    compiled = {"auto": None, "on": True, "off": False}[args.compile_decode]
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=256, compile_decode=compiled)
    totals = instrument(llm)
    vocab = llm.engine.vocab_size
    short = [(i * 7919) % min(vocab, 10_000) for i in range(1, 33)]
    run_all(llm, [(short, 16)])
    totals.clear()
    seconds = run_all(llm, [(short, args.decode_tokens)])
    report(
        f"1 stream, {args.decode_tokens} tokens: {args.decode_tokens / seconds:.1f} tok/s", totals
    )

    workload = make_workload(
        args.batch,
        args.min_input,
        args.max_input,
        args.min_output,
        args.max_output,
        vocab_size=vocab,
    )
    requests, _ = fit_workload(workload, llm.engine.max_model_len)
    totals.clear()
    seconds = run_all(llm, requests)
    out = sum(n for _, n in requests)
    report(f"{args.batch} requests: {out / seconds:.1f} output tok/s, {seconds:.2f} s", totals)


if __name__ == "__main__":
    main()
