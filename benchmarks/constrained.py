"""Constrained (JSON schema) against free decoding, side by side: the same model, prompts,
batch size and sampling, with and without a schema; decode tok/s over the steps where the
whole batch decodes (a constrained answer ends when its JSON does, and a smaller batch
is slower per token whatever it runs), and the host time the grammar masks took.

    python benchmarks/constrained.py                      # the default model, batch 8
    python benchmarks/constrained.py --model tests/.fixtures/gpt2-tiny --batch 8,32

Runs alternate (free, constrained, free, ...) and the medians of --repeats are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import nanovllm_mlx  # noqa: F401  (loads the fast BLAS before mlx: keep it first)
from nanovllm_mlx import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "hobbies", "city"],
    "additionalProperties": False,
}


def run(llm: LLM, batch: int, max_tokens: int, constrained: bool, seed: int) -> dict:
    engine = llm.engine
    prompt = engine.tokenizer.encode_chat(
        [{"role": "user", "content": "Describe a person as JSON: name, age, hobbies, city."}]
    )
    params = [
        SamplingParams(
            temperature=0.7,
            seed=seed + i,
            max_tokens=max_tokens,
            json_schema=SCHEMA if constrained else None,
            ignore_eos=not constrained,  # free runs would stop whenever; keep them long
        )
        for i in range(batch)
    ]
    before = engine.stats()
    ids = engine.add_requests([prompt] * batch, params)
    decode_s = 0.0
    decode_tokens = 0
    while engine.has_unfinished_requests():
        prompt_before = engine.step_stats.total_prompt_tokens
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        full = len(outputs) == batch and engine.step_stats.last_batch_size == batch
        if full and engine.step_stats.total_prompt_tokens == prompt_before:
            decode_s += elapsed
            decode_tokens += len(outputs)
    after = engine.stats()
    masks = after["grammar_masks"] - before["grammar_masks"]
    mask_s = after["grammar_mask_s"] - before["grammar_mask_s"]
    del ids
    return {
        "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
        "output_tokens": after["output_tokens"] - before["output_tokens"],
        "mask_ms": 1e3 * mask_s / masks if masks else 0.0,
        "mask_share": mask_s / decode_s if decode_s else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", default=None, help="default: the engine's default model")
    ap.add_argument("--batch", default="8", help="comma-separated batch sizes")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-gb", type=float, default=0.5)
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()

    llm = LLM(args.model, max_num_seqs=256, kv_cache_gb=args.kv_cache_gb)
    run(llm, 2, 4, True, 0)  # warm-up: builds the grammar tokenizer, compiles kernels
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.repeats):
            for constrained in (False, True):
                runs[constrained].append(run(llm, batch, args.max_tokens, constrained, 100 * r))
        med = {c: {k: statistics.median(x[k] for x in runs[c]) for k in runs[c][0]} for c in runs}
        row = {
            "batch": batch,
            "free_tok_s": med[False]["decode_tok_s"],
            "constrained_tok_s": med[True]["decode_tok_s"],
            "ratio": med[True]["decode_tok_s"] / med[False]["decode_tok_s"],
            "mask_ms_per_row": med[True]["mask_ms"],
            "mask_share_of_decode": med[True]["mask_share"],
            "constrained_output_tokens": med[True]["output_tokens"],
        }
        rows.append(row)
        print(
            f"batch {batch:4d}: free {row['free_tok_s']:8.1f} tok/s, constrained "
            f"{row['constrained_tok_s']:8.1f} tok/s ({row['ratio']:.2f}x); masks "
            f"{row['mask_ms_per_row']:.3f} ms per row, {100 * row['mask_share_of_decode']:.1f}% "
            f"of decode time"
        )
    if args.json:
        print(json.dumps({"model": llm.engine.model_name, "rows": rows}))


if __name__ == "__main__":
    main()
