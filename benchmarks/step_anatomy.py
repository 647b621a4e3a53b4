"""Where one single-stream decode step's time goes, ours against mlx-lm's, on one model.

For each engine, after a prompt of each --contexts length, --steps greedy decode steps are
timed on the host, phase by phase (--rows: that many sequences of one length decode
together, a batch of one length in mlx-lm's cache):
  - mlx-lm (its generate loop: build token t+1's graph, async_eval it, then wait for t):
    build, launch (the async_eval call: MLX encodes and launches the kernels on the
    calling thread), wait (.item()).
  - ours, compiled and eager decode: the engine's host work outside the runner
    (schedule, update, detokenize), prepare, build (model + sampler graph), launch,
    wait (.tolist()).
Then, where PyTorch's profiler (CUPTI) is importable on a CUDA machine, --profile-steps
more steps of each are traced: kernels per step, the device's busy time per step (the
union of kernel intervals) and the kernels that take the most time. A step whose busy
time is well under its host time is bound by the host (graph building and launches),
not by the device.

    python benchmarks/step_anatomy.py --model tests/.fixtures/llama3-8b-q4 --dtype float16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# isort: off
import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
import mlx.core as mx
# isort: on

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.engine.llm_engine import LLMEngine
from nanovllm_mlx.engine.runner import model_runner as mr

Phases = dict[str, list[float]]
Around = Callable[[], contextlib.AbstractContextManager[Any]]


def prompts_of(length: int, vocab: int, salt: int, rows: int) -> list[list[int]]:
    return [
        [(i * 7919 + 104729 * (salt * 64 + r)) % min(vocab, 10_000) + 1 for i in range(length)]
        for r in range(rows)
    ]


# mlx-lm ------------------------------------------------------------------------------------


def theirs(
    model, prompts: list[list[int]], steps: int, around: Around = contextlib.nullcontext
) -> Phases:
    """mlx-lm's generate_step pipelining, with timers between its calls, over a batch of
    prompts of one length (its cache's batch dimension); `around` wraps the timed steps
    alone (the profiler)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompts), cache=cache)
    y = mx.argmax(logits[:, -1], axis=-1)
    mx.async_eval(y)  # type: ignore[no-untyped-call]
    y.tolist()
    phases: Phases = defaultdict(list)
    with around():
        for _ in range(steps):
            t0 = time.perf_counter()
            nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            t1 = time.perf_counter()
            mx.async_eval(nxt)  # type: ignore[no-untyped-call]
            t2 = time.perf_counter()
            y.tolist()
            t3 = time.perf_counter()
            y = nxt
            for name, a, b in (("build", t0, t1), ("launch", t1, t2), ("wait", t2, t3)):
                phases[name].append(b - a)
            phases["step"].append(t3 - t0)
        y.tolist()
    return phases


# ours --------------------------------------------------------------------------------------


class Timers:
    """Wraps the runner's phases (module functions and methods) with timers; each step's
    sums land in `phases` when `close_step` is called."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.phases: Phases = defaultdict(list)
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner, attr: str, phase: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self.undo.append(lambda: setattr(owner, attr, fn))

    def close_step(self, total: float) -> None:
        inner = dict(self.current)
        run = inner.pop("run", 0.0)
        for name, value in inner.items():
            self.phases[name].append(value)
        self.phases["wait"].append(run - sum(inner.values()))
        self.phases["engine"].append(total - run)
        self.phases["step"].append(total)
        self.current.clear()

    def restore(self) -> None:
        for undo in reversed(self.undo):
            undo()


def ours(
    llm: LLM, prompts: list[list[int]], steps: int, around: Around = contextlib.nullcontext
) -> Phases:
    engine: LLMEngine = llm.engine
    runner = engine.model_runner
    t = Timers()
    t.wrap(runner, "run", "run")
    t.wrap(mr, "prepare", "prepare")
    t.wrap(mr, "prepare_decode", "prepare")
    t.wrap(runner, "forward", "build")
    t.wrap(mr, "sample", "build")
    t.wrap(mr.mx, "async_eval", "launch")
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    try:
        started: set[str] = set()
        while len(started) < len(prompts):  # the prompts' chunks, up to their first tokens
            started.update(out.request_id for out in engine.step() if out.token_ids)
        engine.step()
        t.current.clear()
        with around():
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.step()
                t.close_step(time.perf_counter() - t0)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        t.restore()
    return t.phases


# the device's view (CUPTI through PyTorch's profiler) ----------------------------------------


def device_view(label: str, run: Callable[[Around], object], steps: int) -> None:
    try:
        import torch
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print(f"  {label}: no PyTorch profiler here")
        return
    if not torch.cuda.is_available():
        print(f"  {label}: PyTorch sees no CUDA device")
        return
    torch.cuda.init()
    prof = profile(activities=[ProfilerActivity.CUDA])
    run(lambda: prof)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not kernels:
        print(f"  {label}: the profiler recorded no kernels")
        return
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    wall = spans[-1][1] - spans[0][0]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.time_range.elapsed_us())
    print(
        f"  {label}: {len(kernels) / steps:.0f} kernels a step, device busy "
        f"{busy / steps / 1e3:.3f} ms of {wall / steps / 1e3:.3f} ms a step"
    )
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:14]
    for name, times in top:
        print(
            f"      {sum(times) / steps / 1e3:7.3f} ms  {len(times) / steps:6.1f}/step  "
            f"{name[:110]}"
        )


def report(label: str, phases: Phases) -> None:
    order = ["engine", "prepare", "build", "launch", "wait", "step"]
    cells = [
        f"{name} {1e3 * statistics.median(phases[name]):.3f}" for name in order if name in phases
    ]
    print(f"  {label:<28} ms a step (medians): " + ", ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--contexts", default="32,8192")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument(
        "--kv-cache-dtypes", default="auto", help="ours, one engine each: auto,int8,..."
    )
    ap.add_argument("--compiled-only", action="store_true", help="ours: skip the eager run")
    ap.add_argument("--rows", type=int, default=1, help="sequences decoding together")
    args = ap.parse_args()
    rows = args.rows
    print(nanovllm_mlx.backend.describe(), f"| {rows} sequence(s) decoding together")
    contexts = [int(c) for c in args.contexts.split(",")]
    max_len = max(contexts) + args.steps + args.profile_steps + 64
    if not args.skip_mlx_lm:
        from mlx_lm import load

        model, _ = load(args.model)
        model.set_dtype(getattr(mx, args.dtype))
        vocab = model.args.vocab_size
        for c in contexts:
            theirs(model, prompts_of(c, vocab, 1, rows), 4)  # warm
            report(f"mlx-lm after {c}", theirs(model, prompts_of(c, vocab, 2, rows), args.steps))
            device_view(
                f"mlx-lm after {c}",
                lambda around, c=c: theirs(
                    model, prompts_of(c, vocab, 3, rows), args.profile_steps, around
                ),
                args.profile_steps,
            )
        del model
        gc.collect()
        mx.clear_cache()
    ways = (True,) if args.compiled_only else (True, False)
    for kv_dtype, compiled in itertools.product(args.kv_cache_dtypes.split(","), ways):
        llm = LLM(
            args.model,
            dtype=args.dtype,
            kv_cache_gb=args.kv_cache_gb,
            kv_cache_dtype=kv_dtype,
            max_model_len=max_len,
            compile_decode=compiled,
        )
        runner = llm.engine.model_runner
        label = ("compiled" if runner.compile_decode else "eager") + f" {kv_dtype}"
        print(
            f"ours, asked {'compiled' if compiled else 'eager'}, KV {kv_dtype}: runs {label}, "
            f"backend {runner.backend.name}, start-up timings {runner.compile_ms}"
        )
        vocab = llm.engine.vocab_size
        for c in contexts:
            ours(llm, prompts_of(c, vocab, 4, rows), 4)  # warm this context's shapes
            report(f"ours {label} after {c}", ours(llm, prompts_of(c, vocab, 5, rows), args.steps))
            device_view(
                f"ours {label} after {c}",
                lambda around, c=c, llm=llm, vocab=vocab: ours(
                    llm, prompts_of(c, vocab, 6, rows), args.profile_steps, around
                ),
                args.profile_steps,
            )
        del llm, runner
        gc.collect()
        mx.clear_cache()


if __name__ == "__main__":
    main()
