"""The nano-vllm throughput workload, shared by `nanovllm bench` and benchmarks/.

`make_workload` reproduces nano-vllm's bench.py recipe (seeded random prompts and output
lengths); `run_benchmark` runs a workload as one continuous batch through the public engine
API and returns the figures as a plain dict.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import closing

import mlx.core as mx

from nanovllm_mlx import backend
from nanovllm_mlx.engine.core.speculation import SpecCounts
from nanovllm_mlx.engine.llm_engine import LLMEngine
from nanovllm_mlx.llm import LLM
from nanovllm_mlx.sampling_params import SamplingParams

# nano-vllm draws prompt token ids below 10,000 whatever the model's vocabulary.
TOKEN_ID_LIMIT = 10_000

Workload = list[tuple[list[int], int]]


def make_workload(
    num_seqs: int = 256,
    min_input: int = 100,
    max_input: int = 1024,
    min_output: int = 100,
    max_output: int = 1024,
    seed: int = 0,
    vocab_size: int = TOKEN_ID_LIMIT,
) -> Workload:
    """(prompt token ids, max_tokens) per request, lengths uniform in the given ranges.

    Prompts are drawn first and output lengths second, as nano-vllm's bench.py does, so the
    same seed gives the same lengths there and here.
    """
    if num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}")
    if not 1 <= min_input <= max_input:
        raise ValueError(f"need 1 <= min_input <= max_input, got {min_input}, {max_input}")
    if not 1 <= min_output <= max_output:
        raise ValueError(f"need 1 <= min_output <= max_output, got {min_output}, {max_output}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = random.Random(seed)
    high = min(TOKEN_ID_LIMIT, vocab_size)
    prompts = [
        [rng.randrange(high) for _ in range(rng.randint(min_input, max_input))]
        for _ in range(num_seqs)
    ]
    outputs = [rng.randint(min_output, max_output) for _ in range(num_seqs)]
    return list(zip(prompts, outputs))


def single_stream(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tok/s after it) for one greedy request that
    ignores EOS: the single-stream figure every comparison script reports."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    request_id = engine.add_request(prompt, params)
    first, n = None, 0
    for outputs in engine.iterate([request_id]):
        for out in outputs:
            n += len(out.token_ids)
            if first is None and out.token_ids:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("the request produced no token")
    return first - start, (n - 1) / (time.perf_counter() - first)


def fit_workload(workload: Workload, max_model_len: int) -> tuple[Workload, int]:
    """Shorten requests that cannot fit the model's context; return them and how many.

    Output lengths are kept where possible (they are what throughput counts), so prompts are
    cut from the end first; an output longer than the context leaves a one-token prompt.
    """
    fitted: Workload = []
    shortened = 0
    for ids, max_tokens in workload:
        max_tokens = max(1, min(max_tokens, max_model_len - 1))
        keep = min(len(ids), max_model_len - max_tokens)
        if keep < len(ids):
            shortened += 1
        fitted.append((list(ids[:keep]), max_tokens))
    return fitted, shortened


def run_benchmark(
    llm: LLM | LLMEngine,
    workload: Workload,
    on_step: Callable[[dict], None] | None = None,
    *,
    temperature: float = 0.6,
    warmup: bool = True,
) -> dict:
    """Run every request at once (ignore_eos) and report throughput.

    on_step, if given, is called after every engine step with a small dict (finished, total,
    elapsed, output_tokens and total_output_tokens (exact, since EOS is ignored),
    prefill_tokens and total_prompt_tokens: what an estimate of the time left needs); it
    must be cheap or throttle itself.

    Definitions: throughput = output tokens / wall seconds (nano-vllm's figure).
    prefill_throughput = prompt tokens computed / seconds of the steps that computed any
    prompt token; decode_throughput = tokens sampled in steps that computed no prompt token /
    seconds of those steps. The engine mixes new prompts into decode steps, so mixed steps
    count as prefill time.
    """
    engine = llm.engine if isinstance(llm, LLM) else llm
    requests, shortened = fit_workload(workload, engine.max_model_len)
    if warmup:
        # The first steps pay for lazy initialisation; keep that out of the figures.
        warm_ids = [i % engine.vocab_size for i in range(1, 17)]
        warm_id = engine.add_request(warm_ids, SamplingParams(max_tokens=4))
        with closing(engine.iterate([warm_id])) as steps:
            for _ in steps:
                pass
    mx.reset_peak_memory()
    before = engine.stats()
    params = [
        SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=max_tokens)
        for _, max_tokens in requests
    ]
    total = len(requests)
    total_output = sum(max_tokens for _, max_tokens in requests)
    total_prompt = sum(len(ids) for ids, _ in requests)
    start = time.perf_counter()
    ids = engine.add_requests([ids for ids, _ in requests], params)
    first_token: dict[str, float] = {}
    finished = output_tokens = steps_run = 0
    prefill_s = decode_s = 0.0
    prefill_tokens = decode_tokens = 0
    batch_sizes = 0
    counters = engine.step_stats
    with closing(engine.iterate(ids)) as steps:
        # Ctrl-C or an error closes the iterator, which aborts what is left: the engine is
        # empty for whoever uses it next.
        p0, o0, t0 = counters.total_prompt_tokens, counters.total_output_tokens, start
        for outputs in steps:
            now = time.perf_counter()
            prompt_delta = counters.total_prompt_tokens - p0
            output_delta = counters.total_output_tokens - o0
            steps_run += 1
            batch_sizes += counters.last_batch_size
            if prompt_delta:
                prefill_s += now - t0
                prefill_tokens += prompt_delta
            else:
                decode_s += now - t0
                decode_tokens += output_delta
            for out in outputs:
                output_tokens += len(out.token_ids)
                first_token.setdefault(out.request_id, now)
                finished += out.finished
            if on_step is not None:
                on_step(
                    {
                        "finished": finished,
                        "total": total,
                        "elapsed": now - start,
                        "output_tokens": output_tokens,
                        "total_output_tokens": total_output,
                        "prefill_tokens": prefill_tokens,
                        "total_prompt_tokens": total_prompt,
                    }
                )
            p0, o0 = counters.total_prompt_tokens, counters.total_output_tokens
            t0 = time.perf_counter()
    seconds = time.perf_counter() - start
    after = engine.stats()
    ttfts = [first_token[i] - start for i in ids if i in first_token]
    drafts, proposed, accepted = (
        after.get(k, 0) - before.get(k, 0)
        for k in ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")
    )
    window = SpecCounts(drafts, proposed, accepted)  # this run's counts alone
    return {
        "model": engine.model_name,
        "backend": backend.describe(),
        "dtype": str(engine.dtype).removeprefix("mlx.core."),
        "num_seqs": total,
        "prompt_tokens": total_prompt,
        "prompt_tokens_computed": after["prompt_tokens"] - before["prompt_tokens"],
        "output_tokens": output_tokens,
        "seconds": seconds,
        "throughput": output_tokens / seconds if seconds else 0.0,
        "prefill_throughput": prefill_tokens / prefill_s if prefill_s else 0.0,
        "decode_throughput": decode_tokens / decode_s if decode_s else 0.0,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "steps": steps_run,
        "mean_batch_size": batch_sizes / steps_run if steps_run else 0.0,
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else 0.0,
        "ttft_max_s": max(ttfts, default=0.0),
        "preemptions": after["preemptions"] - before["preemptions"],
        "prefix_hit_tokens": after["prefix_hit_tokens"] - before["prefix_hit_tokens"],
        "kv_blocks_total": after["kv_blocks_total"],
        "block_size": after["block_size"],
        "kv_cache_dtype": after["kv_cache_dtype"],
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.config.max_num_seqs,
        "requests_shortened": shortened,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "speculative": after.get("speculative"),
        "spec_drafts": drafts,
        "spec_draft_tokens": proposed,
        "spec_accepted_tokens": accepted,
        "spec_acceptance_rate": window.acceptance_rate,
        "spec_tokens_per_step": window.tokens_per_step,
    }
