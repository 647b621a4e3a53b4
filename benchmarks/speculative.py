"""Speculative decoding (n-gram prompt lookup, or a draft model) against plain decoding,
side by side.

Two engines on the same model in one process, one with `speculative="ngram"` (or
`"draft"` with --draft-model), the other without (the same step budget: the second is
given what the first measured). Each case runs on both at once, their steps interleaved
one for one (which engine steps first alternates), so that other jobs on a shared
machine slow both alike at the scale of a step; a rate is tokens over the summed time
of the engine's own steps after the first token (wall clock, and this process's CPU
time). Figures are medians over rounds, the ratio taken per case and round.

Cases: single streams on input-grounded prompts (rewrite, code edit, extraction: answers
that copy from the prompt), single streams of free generation, and 32 requests at once
(grounded and free mixed). Greedy; the two engines' tokens are checked to be the same.

    python benchmarks/speculative.py --model models/SmolLM2-135M-Instruct-Q4_1 --rounds 3

A draft model (benchmarks/draft_targets.py builds larger targets in SmolLM2's tokenizer):

    python benchmarks/speculative.py --model /tmp/smollm2-deep \
        --draft-model models/SmolLM2-135M-Instruct-Q4_1 --cases 2 --max-tokens 64

--force proposes wherever the acceptance pays for the verification alone, leaving the
draft forward's cost out of the adaptive k (SmolLM2 drafting for itself: the engine's own
rule never proposes, a draft forward costing what the step it saves does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import nanovllm_mlx  # noqa: F401  (before mlx: the fast BLAS)
from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.engine.core.speculation import DRAFT_COST

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


class Run:
    """One engine's requests, stepped by `paired` one step at a time."""

    def __init__(self, llm: LLM, prompts: list[list[int]], max_tokens: int):
        self.engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        self.ids = self.engine.add_requests(list(prompts), [params] * len(prompts))
        self.tokens: dict[str, list[int]] = {i: [] for i in self.ids}
        self.left = set(self.ids)
        self.seconds = self.cpu = 0.0  # summed over the steps after the first token
        self.started = False

    def step(self) -> None:
        t, c = time.perf_counter(), time.process_time()
        outputs = self.engine.step()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if self.started:
            self.seconds += dt
            self.cpu += dc
        for out in outputs:
            self.tokens[out.request_id] += out.token_ids
            self.started = self.started or bool(out.token_ids)
            if out.finished:
                self.left.discard(out.request_id)

    def rates(self, single: bool) -> tuple[float, float]:
        """Tokens per second of its steps (wall, and CPU time of this process). A single
        stream's first token is its prefill's, left out as its step time is."""
        n = sum(len(t) for t in self.tokens.values()) - (1 if single else 0)
        return n / self.seconds, n / self.cpu


def paired(a: LLM, b: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[Run, Run]:
    """The same requests on both engines, their steps interleaved one for one (a, b, a,
    b, ...): whatever else loads the machine slows both alike, at the scale of a step."""
    runs = Run(a, prompts, max_tokens), Run(b, prompts, max_tokens)
    while any(r.left for r in runs):
        for r in runs:
            if r.left:
                r.step()
    return runs


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
    ap.add_argument("--draft-model", default=None, help="speculative='draft' with this draft")
    ap.add_argument("--force", action="store_true", help="draft: leave its forward's cost out")
    ap.add_argument("--plain-first", action="store_true", help="build the plain engine first")
    ap.add_argument("--cases", type=int, default=4, help="prompts of each kind (at most 4)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    spec_kw: dict[str, object] = {"speculative": "ngram"}
    if args.draft_model:
        spec_kw = {"speculative": "draft", "draft_model": args.draft_model}
    if args.num_speculative_tokens:
        spec_kw["num_speculative_tokens"] = args.num_speculative_tokens
    # The engine built first ran slower here: two identical plain engines, in lockstep,
    # gave the first 0.84-0.95x the second's tok/s (6 runs of 48 tokens, median 0.87).
    # The speculating one is built first (against it); --plain-first builds the other
    # first (for it): the geometric mean of the two runs' ratios cancels the bias.
    if args.plain_first:
        plain = LLM(args.model)
        budget = plain.engine.max_num_batched_tokens
        spec = LLM(args.model, max_num_batched_tokens=budget, **spec_kw)
    else:
        spec = LLM(args.model, **spec_kw)
        plain = LLM(args.model, max_num_batched_tokens=spec.engine.max_num_batched_tokens)
    speculator = spec.engine.speculator
    assert speculator is not None
    cost = speculator.cost  # a draft token's, as a share of a one-token step
    print(f"a draft token costs {cost:.3f} of a one-token step (estimate)")
    if args.force:
        speculator.cost = DRAFT_COST
    print(f"model {spec.engine.model_name}, budget {spec.engine.max_num_batched_tokens} tokens")
    cases = [("grounded", i, chat(spec, p)) for i, p in enumerate(GROUNDED[: args.cases])]
    cases += [("free", i, chat(spec, p)) for i, p in enumerate(FREE[: args.cases])]
    many = [chat(spec, (GROUNDED + FREE)[i % 8]) for i in range(32)]
    paired(spec, plain, [cases[0][2]], 8)  # warm-up: lazy initialisation out of the figures

    ratios: dict[str, list[float]] = {"grounded": [], "free": [], "batch32": []}
    cpu_ratios: dict[str, list[float]] = {"grounded": [], "free": [], "batch32": []}
    rates: dict[str, dict[str, list[float]]] = {k: {"spec": [], "plain": []} for k in ratios}
    acceptance: dict[str, list[int]] = {k: [0, 0, 0] for k in ratios}
    work = [(kind, i, [prompt], args.max_tokens) for kind, i, prompt in cases]
    if not args.skip_batch:
        work.append(("batch32", 0, many, args.batch_tokens))
    for r in range(args.rounds):
        for kind, i, prompts, max_tokens in work:
            before = spec_counts(spec)
            # Who steps first alternates.
            first, second = (spec, plain) if (r + i) % 2 == 0 else (plain, spec)
            runs = dict(zip((id(first), id(second)), paired(first, second, prompts, max_tokens)))
            s_run, p_run = runs[id(spec)], runs[id(plain)]
            after = spec_counts(spec)
            for j in range(3):
                acceptance[kind][j] += after[j] - before[j]
            assert s_run.tokens and [s_run.tokens[x] for x in s_run.ids] == [
                p_run.tokens[x] for x in p_run.ids
            ], f"{kind} {i}: outputs differ"
            one = kind != "batch32"
            (sw, sc), (pw, pc) = s_run.rates(one), p_run.rates(one)
            rates[kind]["spec"].append(sw)
            rates[kind]["plain"].append(pw)
            ratios[kind].append(sw / pw)
            cpu_ratios[kind].append(sc / pc)
            n = sum(len(t) for t in s_run.tokens.values())
            print(
                f"round {r} {kind:8} {i}: spec {sw:6.1f} plain {pw:6.1f} tok/s  x{sw / pw:.2f} "
                f"(CPU time x{sc / pc:.2f}, {n} tokens)",
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
    if args.draft_model:
        stats = spec.stats()
        plain_free = summary.get("free", {}).get("plain_tok_s_median", 0.0)
        summary["draft"] = {
            "draft_model": args.draft_model,
            "forced": args.force,
            "draft_forwards": stats["spec_draft_forwards"],
            "draft_s": stats["spec_draft_s"],
            # A draft forward (any batch, the first of a step with its catch-up) against
            # a plain single-stream step: what the adaptive k estimates from the weights.
            "draft_forward_ms": 1e3 * stats["spec_draft_s"] / max(stats["spec_draft_forwards"], 1),
            "plain_single_step_ms": 1e3 / plain_free if plain_free else None,
            "estimated_cost_per_draft_token": cost,
        }
    print(json.dumps({"model": spec.engine.model_name, **summary}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
