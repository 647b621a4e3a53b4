"""N-gram (prompt lookup) speculative decoding against plain decoding, side by side.

Two engines on the same model in one process, one with `speculative="ngram"`, the other
without (the same step budget: the second is given what the first measured). Each round
runs every case on both, in alternating order, so that a machine shared with other jobs
slows both alike; the figures are medians over rounds, and the ratio is taken per round.

Cases: single streams on input-grounded prompts (rewrite, code edit, extraction: answers
that copy from the prompt), single streams of free generation, and 32 requests at once
(grounded and free mixed). Greedy; the two engines' tokens are checked to be the same.

    python benchmarks/speculative.py --model models/SmolLM2-135M-Instruct-Q4_1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import nanovllm_mlx  # noqa: F401  (before mlx: the fast BLAS)
from nanovllm_mlx import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent

CODE = '''def keys_read(context, layer_windows):
    """Cached keys a token after `context` ones reads, averaged over the layers."""
    if not layer_windows:
        return float(context)
    total = 0
    for w in layer_windows:
        total += context if w is None else min(context, w)
    return total / len(layer_windows)


def blocks_needed(num_tokens, block_size):
    return -(-num_tokens // block_size)
'''

TEXT = (
    "The scheduler is the one writer of a sequence's progress. It plans a step, and once "
    "the step's tokens are in it moves the sequences on. Running sequences go first, oldest "
    "first, so that decodes never wait behind new prompts. When the cache runs out of "
    "blocks, the newest sequence is preempted and recomputed later rather than failing. "
    "A prompt that does not fit the step's budget is cut into chunks, and the chunk that is "
    "cut short takes the whole rest of the budget."
)

GROUNDED = [
    f"Rewrite the following text word for word, changing nothing:\n\n{TEXT}",
    "In the following Python code, rename the function `keys_read` to `cached_keys` and "
    f"write out the whole code:\n\n```python\n{CODE}```",
    f"Copy the sentences of this text that mention the scheduler:\n\n{TEXT}",
    f"Add a docstring to the second function and write out all the code:\n\n```python\n{CODE}```",
]
FREE = [
    "Write a short story about a dragon who learns to bake bread.",
    "Explain how photosynthesis works to a ten-year-old.",
    "List some ideas for a weekend trip in the mountains, with reasons.",
    "Why is the sky blue? Answer in a few paragraphs.",
]


def chat(llm: LLM, text: str) -> list[int]:
    return llm.engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def single(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
    """Decode tok/s after the first token (wall clock, and per second of this process's
    CPU time: less swayed by other jobs on a shared machine), and the tokens."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    rid = engine.add_request(prompt, params)
    first = cpu = None
    tokens: list[int] = []
    for outputs in engine.iterate([rid]):
        for out in outputs:
            if first is None and out.token_ids:
                first, cpu = time.perf_counter(), time.process_time()
            tokens += out.token_ids
    assert first is not None and cpu is not None
    seconds, cpu_s = time.perf_counter() - first, time.process_time() - cpu
    n = len(tokens) - 1
    return (n / seconds if n else 0.0), (n / cpu_s if n else 0.0), tokens


def batch(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Output tok/s of all requests at once, wall clock from submission."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start = time.perf_counter()
    ids = engine.add_requests(list(prompts), [params] * len(prompts))
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    for outputs in engine.iterate(ids):
        for out in outputs:
            tokens[out.request_id] += out.token_ids
    seconds = time.perf_counter() - start
    return sum(len(t) for t in tokens.values()) / seconds, [tokens[i] for i in ids]


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    s = llm.engine.stats()
    return s["spec_drafts"], s["spec_draft_tokens"], s["spec_accepted_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct-Q4_1"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=48)
    ap.add_argument("--num-speculative-tokens", type=int, default=None)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    spec_kw: dict[str, object] = {"speculative": "ngram"}
    if args.num_speculative_tokens:
        spec_kw["num_speculative_tokens"] = args.num_speculative_tokens
    spec = LLM(args.model, **spec_kw)
    plain = LLM(args.model, max_num_batched_tokens=spec.engine.max_num_batched_tokens)
    print(f"model {spec.engine.model_name}, budget {spec.engine.max_num_batched_tokens} tokens")
    cases = [("grounded", i, chat(spec, p)) for i, p in enumerate(GROUNDED)]
    cases += [("free", i, chat(spec, p)) for i, p in enumerate(FREE)]
    many = [chat(spec, (GROUNDED + FREE)[i % 8]) for i in range(32)]
    for llm in (spec, plain):  # warm-up: lazy initialisation out of the figures
        single(llm, cases[0][2], 8)

    ratios: dict[str, list[float]] = {"grounded": [], "free": [], "batch32": []}
    cpu_ratios: dict[str, list[float]] = {"grounded": [], "free": []}
    rates: dict[str, dict[str, list[float]]] = {k: {"spec": [], "plain": []} for k in ratios}
    acceptance: dict[str, list[int]] = {"grounded": [0, 0, 0], "free": [0, 0, 0]}
    for r in range(args.rounds):
        for kind, i, prompt in cases:
            order = [("spec", spec), ("plain", plain)]
            if (r + i) % 2:
                order.reverse()
            got = {}
            for name, llm in order:
                before = spec_counts(spec)
                rate, cpu_rate, tokens = single(llm, prompt, args.max_tokens)
                if name == "spec":
                    after = spec_counts(spec)
                    for j in range(3):
                        acceptance[kind][j] += after[j] - before[j]
                got[name] = (rate, tokens, cpu_rate)
            assert got["spec"][1] == got["plain"][1], f"{kind} {i}: outputs differ"
            rates[kind]["spec"].append(got["spec"][0])
            rates[kind]["plain"].append(got["plain"][0])
            ratios[kind].append(got["spec"][0] / got["plain"][0])
            cpu_ratios[kind].append(got["spec"][2] / got["plain"][2])
            print(
                f"round {r} {kind:8} {i}: spec {got['spec'][0]:6.1f} plain "
                f"{got['plain'][0]:6.1f} tok/s  x{got['spec'][0] / got['plain'][0]:.2f} "
                f"(per CPU second x{got['spec'][2] / got['plain'][2]:.2f}, "
                f"{len(got['spec'][1])} tokens)",
                flush=True,
            )
        if args.skip_batch:
            continue
        order = [("spec", spec), ("plain", plain)]
        if r % 2:
            order.reverse()
        got32 = {name: batch(llm, many, args.batch_tokens) for name, llm in order}
        assert got32["spec"][1] == got32["plain"][1], "batch outputs differ"
        rates["batch32"]["spec"].append(got32["spec"][0])
        rates["batch32"]["plain"].append(got32["plain"][0])
        ratios["batch32"].append(got32["spec"][0] / got32["plain"][0])
        print(
            f"round {r} batch32: spec {got32['spec'][0]:6.1f} plain {got32['plain'][0]:6.1f} "
            f"tok/s  x{got32['spec'][0] / got32['plain'][0]:.2f}",
            flush=True,
        )
    summary = {}
    for kind, values in ratios.items():
        if not values:
            continue
        summary[kind] = {
            "spec_tok_s_median": statistics.median(rates[kind]["spec"]),
            "plain_tok_s_median": statistics.median(rates[kind]["plain"]),
            "ratio_median": statistics.median(values),
            "ratio_min": min(values),
            "runs": len(values),
        }
        if kind in cpu_ratios:
            summary[kind]["cpu_ratio_median"] = statistics.median(cpu_ratios[kind])
        if kind in acceptance:
            drafts, proposed, accepted = acceptance[kind]
            summary[kind]["acceptance_rate"] = accepted / proposed if proposed else 0.0
            summary[kind]["tokens_per_draft_step"] = 1 + accepted / drafts if drafts else 0.0
    print(json.dumps({"model": spec.engine.model_name, **summary}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
