"""Features built apart, used together: speculation over a quantized KV cache, the
quantized cache under attention sinks (gpt-oss) and KV sharing (Gemma 4), and the
combinations the engine refuses, each in one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import SMALL_KV, random_ids

from nanovllm_mlx import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# Prompts that repeat themselves: the n-gram lookup finds drafts in them.
LOOPING = [(random_ids(5, seed=s) * 6)[: 24 + s] for s in range(4)] + [random_ids(30, seed=9)]


def tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_speculation_over_a_quantized_cache_gives_its_tokens(qwen3_tiny: Path, kv: str):
    """A rejected draft's rows were written quantized and are then overwritten: the
    speculating engine's greedy tokens are the plain engine's on the same quantized pool."""
    options = {**SMALL_KV, "kv_cache_dtype": kv}
    want = tokens(LLM(str(qwen3_tiny), **options), LOOPING)
    spec = LLM(
        str(qwen3_tiny),
        speculative="ngram",
        num_speculative_tokens=4,
        prompt_lookup_min=1,
        **options,
    )
    assert tokens(spec, LOOPING) == want
    stats = spec.stats()
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("fixture", ["gpt_oss_tiny", "gemma4_tiny"])
def test_an_int8_cache_runs_sinks_and_shared_kv_close_to_the_float_cache(
    fixture: str, request: pytest.FixtureRequest
):
    """int8 K/V on gpt-oss (sinks in every softmax) and Gemma 4 (layers reading another
    layer's pool), chunked: the first logits stay close to the float cache's and int4's
    are further off. (These random fixtures amplify K/V error about 10x more than the
    tiny Qwen3: mean |logit difference| 0.35 and 0.19 at int8 against 0.04, logits of
    std 4; tests/test_kv_quant.py checks the readers exactly, sinks included.)"""
    from helpers import captured_logits

    model = str(request.getfixturevalue(fixture))
    prompts = [random_ids(n, seed=n) for n in (40, 17, 63)]
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    options = {**SMALL_KV, "dtype": "float32", "max_num_batched_tokens": 32}
    logits = {}
    for kv in ("auto", "int8", "int4"):
        with captured_logits() as seen:
            LLM(model, kv_cache_dtype=kv, **options).generate(prompts, first)
        logits[kv] = np.concatenate([x.reshape(-1) for x in seen])
    err8, err4 = (np.abs(logits[kv] - logits["auto"]).mean() for kv in ("int8", "int4"))
    assert 0 < err8 < 0.15 * logits["auto"].std() and err8 < err4, (err8, err4)


def test_a_latent_cache_refuses_quantization_in_one_line(deepseek_v3_tiny: Path):
    with pytest.raises(ValueError, match="multi-head latent attention"):
        LLM(str(deepseek_v3_tiny), kv_cache_dtype="int8", **SMALL_KV)


def test_a_hybrid_model_runs_on_a_quantized_cache(qwen35_tiny: Path):
    """Qwen3.5's attention layers quantize their K/V; its recurrent states stay float."""
    prompts = [random_ids(n, seed=n) for n in (30, 9)]
    want = tokens(LLM(str(qwen35_tiny), **SMALL_KV), prompts)
    got = tokens(LLM(str(qwen35_tiny), kv_cache_dtype="int8", **SMALL_KV), prompts)
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert same >= 0.75 * sum(len(w) for w in want), (want, got)
