"""Where a long prompt's time to first token goes: each prefill step's wall time and
tokens, under each step key cost asked for, and the attention calls those steps make
(dtype, shapes, mask), on one model.

The scheduler cuts a late chunk of a long prompt shorter by the key cost the start-up
measured (engine/runner/budget.py); --key-costs runs the same prompts with that cost
replaced (0: tokens alone), so a mismeasured cost shows as many short steps. A chunk
whose time grows with the context before it is attention-bound; one that stays flat is
bound by the projections. Every distinct SDPA call is listed once, so a call that leaves
MLX's fused kernels (a float32 query, an array mask) shows by its signature. Last, the
start-up's old key probe (16 tokens after 496 keys, against 16 after none) five times:
on a GPU its difference is launch noise.

--batch N runs compare_mlx_lm.py's batched workload of N requests instead, seeds 0, 0, 1,
2 (the second round repeats the first's shapes, so what a new shape builds shows as the
difference; the last two bring new prompt lengths), and prints every step that computed
prompt tokens: its time, decode rows and prompt chunks (tokens@start), then the
decode-only steps' count and median.

    python benchmarks/prefill_probe.py --model /tmp/fx/llama3-8b-q4 --lengths 4096,16384
    python benchmarks/prefill_probe.py --model /tmp/fx/llama3-8b-q4 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.bench import fit_workload, make_workload
from nanovllm_mlx.engine.runner import budget

calls: Counter[str] = Counter()
_sdpa = mx.fast.scaled_dot_product_attention


def recording_sdpa(q: mx.array, k: mx.array, v: mx.array, **kw: object) -> mx.array:
    mask = kw.get("mask")
    kind = mask if isinstance(mask, str) or mask is None else f"array{tuple(mask.shape)}"
    calls[f"q {q.dtype} {tuple(q.shape)} k {tuple(k.shape)} mask {kind}"] += 1
    return _sdpa(q, k, v, **kw)


def prefill_steps(llm: LLM, prompt: list[int]) -> list[tuple[float, int]]:
    """(wall seconds, prompt tokens computed) of each engine step until the first token."""
    engine = llm.engine
    request_id = engine.add_request(
        prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    )
    steps, done = [], 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        progress = engine.progress(request_id)
        now = len(prompt) if progress is None else progress[0]
        steps.append((time.perf_counter() - t0, now - done))
        done = now
    return steps


def batch_steps(llm: LLM, size: int, seed: int, vocab: int) -> None:
    """One batched round (compare_mlx_lm.py's workload): each prefill step, then decode's."""
    engine = llm.engine
    workload = make_workload(size, 256, 2048, 128, 256, seed=seed, vocab_size=vocab)
    workload, _ = fit_workload(workload, engine.max_model_len)
    plans = []
    schedule = engine.scheduler.schedule

    def recording_schedule():  # type: ignore[no-untyped-def]
        plan = schedule()
        chunks = [(i.num_new_tokens, i.seq.num_computed_tokens) for i in plan.batch]
        plans.append((sum(n == 1 for n, _ in chunks), [f"{n}@{s}" for n, s in chunks if n > 1]))
        return plan

    engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for _, n in workload]
    engine.add_requests([ids for ids, _ in workload], params)
    times = []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        s0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - s0)
    total = time.perf_counter() - t0
    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    decode = [t for t, (_, chunks) in zip(times, plans) if not chunks]
    prefill = [(t, p) for t, p in zip(times, plans) if p[1]]
    print(
        f"batch {size}, seed {seed}: {total:.2f} s, {len(times)} steps; prefill steps "
        f"{sum(t for t, _ in prefill):.2f} s, decode-only {len(decode)} steps "
        f"{sum(decode):.2f} s (median {1e3 * statistics.median(decode or [0]):.1f} ms)"
    )
    for t, (rows, chunks) in prefill:
        print(f"  {1e3 * t:7.1f} ms  decode rows {rows:3d}  chunks {' '.join(chunks)}")
    # Decode-only steps by their rows: what a step of each batch size costs (the bucket it
    # pads to, its first trace included in the largest of them).
    by_rows: dict[int, list[float]] = {}
    for t, (rows, chunks) in zip(times, plans):
        if not chunks:
            by_rows.setdefault(rows, []).append(t)
    print(
        "  decode-only steps by rows: "
        + ", ".join(
            f"{rows}: {len(ts)} x {1e3 * statistics.median(ts):.1f} ms (max {1e3 * max(ts):.0f})"
            for rows, ts in sorted(by_rows.items(), reverse=True)
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--key-costs", default="measured,0", help="'measured' or numbers")
    ap.add_argument("--batch", type=int, default=0, help="N requests instead (see above)")
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    print(nanovllm_mlx.backend.describe())
    t0 = time.perf_counter()
    # --batch: the model's context, as compare_mlx_lm.py, and no prefix cache, so that a
    # round repeated computes all its prompts again.
    max_len = None if args.batch else max(lengths) + 64
    llm = LLM(
        args.model, dtype=args.dtype, max_model_len=max_len, enable_prefix_caching=not args.batch
    )
    cost = llm.engine.scheduler.cost
    measured = cost.key_cost
    print(
        f"loaded in {time.perf_counter() - t0:.1f} s: {llm.engine.max_num_batched_tokens} "
        f"tokens a step, key cost {measured:.3g} tokens a cached key; start-up phases "
        f"(s): { {k: round(v, 2) for k, v in llm.engine.startup_s.items()} }"
    )
    vocab = min(llm.engine.vocab_size, 10_000)
    if args.batch:
        for seed in (0, 0, 1, 2):
            batch_steps(llm, args.batch, seed, llm.engine.vocab_size)
        return
    mx.fast.scaled_dot_product_attention = recording_sdpa
    for round_, key_cost in enumerate(args.key_costs.split(",")):
        cost.key_cost = measured if key_cost == "measured" else float(key_cost)
        for salt, n in enumerate(lengths):
            seed = 100 * round_ + 10 * salt  # no prompt twice: the prefix cache would hit
            prefill_steps(llm, [(i * 31 + seed) % vocab for i in range(n)])  # its shapes
            for r in range(args.repeats):
                prompt = [(i * 7919 + 104729 * (seed + r + 1)) % vocab for i in range(n)]
                steps = prefill_steps(llm, prompt)
                cells = " ".join(f"{1e3 * t:.0f}/{k}" for t, k in steps)
                print(
                    f"key cost {cost.key_cost:.3g}, {n} tokens: TTFT "
                    f"{sum(t for t, _ in steps):.3f} s in {len(steps)} steps "
                    f"(ms/tokens): {cells}",
                    flush=True,
                )
    mx.fast.scaled_dot_product_attention = _sdpa
    print("SDPA calls (signature: count):")
    for signature, count in calls.most_common():
        print(f"  {signature}: {count}")
    runner = llm.engine.model_runner
    gaps = [
        budget._prefill_seconds(runner, budget.PROBE_TOKENS, 496)
        - budget._prefill_seconds(runner, budget.PROBE_TOKENS)
        for _ in range(5)
    ]
    print("old key probe, after 496 keys minus after none (ms):", [f"{1e3 * g:.2f}" for g in gaps])


if __name__ == "__main__":
    main()
