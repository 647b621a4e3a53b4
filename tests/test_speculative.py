"""N-gram speculative decoding on the engine: the same tokens as without it (greedy, and
seeded sampling), with every feature a draft crosses (batching with sequences that do not
speculate, forks, preemption, prefix hits, stops, max_tokens, logprobs, grammars), the
sampled distribution unchanged, and hostile settings refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    SMALL_KV,
    SPEC_PATTERNS,
    choice_ids,
    metrics_after_completion,
    random_ids,
    run_cli,
    seeded_forks,
    serving,
    small_bench,
)

from nanovllm_mlx import LLM, SamplingParams

# The tiny Qwen3's K/V: 2 layers x (K, V) x 2 heads x 16 dims x 16 tokens, float32.
KV_20_BLOCKS = (20.5 * 2 * 2 * 2 * 16 * 16 * 4) / 2**30
SPEC = {"speculative": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def plain(qwen3_tiny: Path) -> LLM:
    return LLM(str(qwen3_tiny), **SMALL_KV)


@pytest.fixture(scope="module")
def spec(qwen3_tiny: Path) -> LLM:
    return LLM(str(qwen3_tiny), **SPEC, **SMALL_KV)


def exercised(llm: LLM, before: dict) -> None:
    """Drafts were verified, some tokens accepted and some rejected."""
    after = llm.stats()
    proposed = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert 0 < accepted < proposed, (accepted, proposed)


def test_greedy_batch_is_identical_and_mixes_with_sequences_that_do_not_speculate(
    plain: LLM, spec: LLM
):
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        # Penalties read the history: this one never speculates, in the same batch.
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3),
    ]
    mixed = [params[i % 3 == 2] for i in range(len(SPEC_PATTERNS))]
    before = spec.stats()
    assert choice_ids(spec.generate(SPEC_PATTERNS, mixed)) == choice_ids(
        plain.generate(SPEC_PATTERNS, mixed)
    )
    exercised(spec, before)
    s = spec.stats()
    assert s["speculative"] == "ngram"
    assert 0 < s["spec_acceptance_rate"] < 1 and s["spec_tokens_per_step"] > 1


@pytest.mark.parametrize("fixture", ["gemma3_tiny", "phi3_tiny", "mixtral_tiny"])
def test_sliding_windows_and_experts_give_the_same_tokens(
    fixture: str, request: pytest.FixtureRequest
):
    """Gemma 3's interleaved sliding layers, Phi-3's all-sliding ones (blocks out of the
    window are freed as a sequence advances: a rejected tail must not move that on) and
    Mixtral's experts, past their windows, greedy and seeded."""
    path = str(request.getfixturevalue(fixture))
    prompts = [p * 3 for p in SPEC_PATTERNS[:4]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=60, ignore_eos=True),
    ]
    mixed = [params[i % 2] for i in range(len(prompts))]
    want = choice_ids(LLM(path, **SMALL_KV).generate(prompts, mixed))
    spec = LLM(path, **SPEC, **SMALL_KV)
    assert choice_ids(spec.generate(prompts, mixed)) == want
    assert spec.stats()["spec_drafts"] > 0 and spec.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_is_identical_with_forks_and_logprobs(plain: LLM, spec: LLM):
    """A draft token is kept where the draw at its position (same per-position noise as
    without speculation) equals it: a seeded request's tokens do not change."""
    params = seeded_forks()
    before = spec.stats()
    # Two prompts, six choices: a batch narrow enough for drafts to pay (best_k).
    prompts = [SPEC_PATTERNS[1], SPEC_PATTERNS[7]]
    got, want = spec.generate(prompts, params), plain.generate(prompts, params)
    exercised(spec, before)
    assert choice_ids(got) == choice_ids(want)
    for g, w in zip(got, want):
        for gc, wc in zip(g["outputs"], w["outputs"]):
            assert gc["logprobs"] == pytest.approx(wc["logprobs"], abs=1e-4)
            assert len(gc["top_logprobs"]) == len(gc["token_ids"])
            for gt, wt in zip(gc["top_logprobs"], wc["top_logprobs"]):
                assert list(gt) == list(wt)


def test_stops_and_max_tokens_inside_accepted_drafts(plain: LLM, spec: LLM):
    """Every stop lands at each position of the plain output in turn: the speculating run
    must end at the same token, with the same text, never past max_tokens."""
    base = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = plain.generate(SPEC_PATTERNS, base)
    for prompt, ref in zip(SPEC_PATTERNS[:4], reference[:4]):
        out = ref["token_ids"]
        for at in range(1, 16):
            cases = [
                SamplingParams(temperature=0.0, max_tokens=at, ignore_eos=True),
                SamplingParams(
                    temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[out[at]]
                ),
            ]
            text = plain.tokenizer.decode(out[: at + 1])
            if text.strip():
                cases.append(
                    SamplingParams(
                        temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text[-3:]]
                    )
                )
            for p in cases:
                got, want = spec.generate([prompt], p)[0], plain.generate([prompt], p)[0]
                assert got["token_ids"] == want["token_ids"], (at, p)
                assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
                assert len(got["token_ids"]) <= p.max_tokens


def test_preemption_and_prefix_hits_give_the_same_tokens(qwen3_tiny: Path, plain: LLM):
    prompts = SPEC_PATTERNS + SPEC_PATTERNS[:4]  # repeats: prefix-cache hits
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    want = choice_ids(plain.generate(prompts, params))
    # 20 blocks of 16 tokens hold ~4 of these 80-token sequences at once.
    tight = LLM(str(qwen3_tiny), kv_cache_gb=KV_20_BLOCKS, max_model_len=128, **SPEC)
    assert tight.engine.block_manager.num_blocks == 20
    assert choice_ids(tight.generate(prompts, params)) == want
    s = tight.stats()
    assert s["preemptions"] > 0 and s["spec_accepted_tokens"] > 0
    assert s["prefix_hit_tokens"] > 0
    assert s["kv_blocks_used"] == 0  # every trimmed and finished block came back


def test_tight_budget_and_context_limit(qwen3_tiny: Path):
    """Drafts only take what the step budget leaves (a budget of 4 tokens: at most 3 draft
    tokens, shared by the batch), and never pass the context."""
    small = LLM(
        str(qwen3_tiny),
        **{**SPEC, "num_speculative_tokens": 8},
        max_num_batched_tokens=4,
        max_model_len=64,
        **SMALL_KV,
    )
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    prompts = SPEC_PATTERNS[:3]
    limited = LLM(str(qwen3_tiny), max_num_batched_tokens=4, max_model_len=64, **SMALL_KV)
    want = limited.generate(prompts, params)
    got = small.generate(prompts, params)
    assert choice_ids(got) == choice_ids(want)
    assert all(len(r["token_ids"]) + len(p) == 64 for r, p in zip(got, prompts))
    assert small.stats()["spec_accepted_tokens"] > 0


def test_look_ahead_and_compiled_decode_give_the_same_tokens(qwen3_tiny: Path, plain: LLM):
    """The runner launches a decode step before reading the last one back only for a batch
    where no sequence would propose (then that step proposes nothing); a step with drafts
    is a chunked one, never the compiled decode. Greedy and seeded as without either."""
    fast = LLM(str(qwen3_tiny), async_scheduling=True, compile_decode=True, **SPEC, **SMALL_KV)
    params = [
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, max_tokens=60, ignore_eos=True),
    ]
    mixed = [params[i % 2] for i in range(len(SPEC_PATTERNS))]
    before = fast.stats()
    assert choice_ids(fast.generate(SPEC_PATTERNS, mixed)) == choice_ids(
        plain.generate(SPEC_PATTERNS, mixed)
    )
    exercised(fast, before)
    one = fast.generate(SPEC_PATTERNS[-1:], params[0])  # alone: its probes leave room to launch
    assert choice_ids(one) == choice_ids(plain.generate(SPEC_PATTERNS[-1:], params[0]))
    s = fast.stats()
    assert s["steps_ahead_used"] > 0 and s["compiled_buckets"] > 0


def test_structured_output_does_not_speculate_and_is_unchanged(plain: LLM, spec: LLM):
    params = SamplingParams(temperature=0.0, max_tokens=20, regex="(ab|cd)+x")
    before = spec.stats()["spec_drafts"]
    assert choice_ids(spec.generate(SPEC_PATTERNS[:2], params)) == choice_ids(
        plain.generate(SPEC_PATTERNS[:2], params)
    )
    assert spec.stats()["spec_drafts"] == before


def test_sampled_distribution_is_unchanged(qwen3_tiny: Path, monkeypatch: pytest.MonkeyPatch):
    """Unseeded sampling (temperature 0.5, top-k 8) from each engine's own (fixed-seed) stream, so
    the two runs draw differently; every sequence is made to propose the same draft (the
    greedy continuation, so that it is accepted often and rejected often). The second and
    third output tokens' frequencies over 1,500 requests must agree with those without
    speculation (chi-square two-sample tests; fixed seeds, so it cannot flake)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    wide = {"max_num_batched_tokens": 2048, **SMALL_KV}
    plain = LLM(str(qwen3_tiny), **wide)
    spec = LLM(str(qwen3_tiny), **SPEC, **wide)
    prompt = random_ids(12, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    draft = plain.generate([prompt], greedy)[0]["token_ids"]
    speculator = spec.engine.speculator
    assert speculator is not None
    # The draft after the first token: what greedy decoding gives after its first token.
    monkeypatch.setattr(speculator, "propose", lambda seq, limit, *_: list(draft[1 : 1 + limit]))
    params = SamplingParams(temperature=0.5, top_k=8, max_tokens=3, ignore_eos=True)
    counts: list[list[dict[int, int]]] = []
    for llm in (plain, spec):
        tallies: list[dict[int, int]] = [{}, {}]
        for _ in range(3):
            for r in llm.generate([prompt] * 500, params):
                for i, tally in enumerate(tallies):
                    token = r["token_ids"][i + 1]
                    tally[token] = tally.get(token, 0) + 1
        counts.append(tallies)
    s = spec.stats()
    assert s["spec_drafts"] >= 1500 and 0.05 < s["spec_acceptance_rate"] < 0.95
    for position in (0, 1):
        a, b = counts[0][position], counts[1][position]
        # Tokens seen fewer than 10 times in either run are pooled, as the test needs.
        table, rest = [], [0, 0]
        for t in sorted(set(a) | set(b)):
            pair = [a.get(t, 0), b.get(t, 0)]
            if min(pair) >= 10:
                table.append(pair)
            else:
                rest = [rest[0] + pair[0], rest[1] + pair[1]]
        if sum(rest):
            table.append(rest)
        assert len(table) >= 3
        p_value = scipy_stats.chi2_contingency(table).pvalue
        assert p_value > 0.001, (position, p_value, table)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speculative": "draft"}, "needs a draft model"),
        ({"speculative": "eagle"}, "speculative must be 'ngram'"),
        ({"speculative": "ngram", "num_speculative_tokens": 0}, r"in \[1, 64\], got 0"),
        ({"speculative": "ngram", "num_speculative_tokens": -3}, r"in \[1, 64\], got -3"),
        ({"speculative": "ngram", "num_speculative_tokens": 10**9}, r"got 1000000000"),
        ({"speculative": "ngram", "num_speculative_tokens": 2.5}, "must be an integer"),
        ({"speculative": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "<="),
        ({"speculative": "ngram", "prompt_lookup_min": 0}, r"in \[1, 64\]"),
        ({"num_speculative_tokens": 3}, "needs speculative decoding"),
    ],
)
def test_hostile_settings_are_one_line_errors(gpt2_tiny: Path, kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        LLM(str(gpt2_tiny), **kwargs, **SMALL_KV)


def test_recurrent_models_are_refused(qwen35_tiny: Path):
    with pytest.raises(ValueError, match="recurrent state"):
        LLM(str(qwen35_tiny), speculative="ngram", **SMALL_KV)


def test_server_metrics_and_panel(qwen3_tiny: Path):
    from rich.console import Console

    from cli.serve import Rates, render_panel
    from nanovllm_mlx.serving.app import create_app
    from nanovllm_mlx.serving.snapshot import EngineSnapshot

    app = create_app(str(qwen3_tiny), **SPEC, **SMALL_KV)
    with serving(app) as base_url:
        m = metrics_after_completion(base_url, SPEC_PATTERNS[0], "qwen3-tiny")
    drafts = m["nanovllm_spec_decode_num_drafts_total"]
    accepted = m["nanovllm_spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and accepted <= m["nanovllm_spec_decode_num_draft_tokens_total"]
    assert m["nanovllm_spec_decode_tokens_per_step"] == pytest.approx(1 + accepted / drafts)
    stats = {
        "spec_drafts": 10,
        "spec_draft_tokens": 40,
        "spec_accepted_tokens": 30,
        "spec_acceptance_rate": 0.75,
        "spec_tokens_per_step": 4.0,
    }
    snap = EngineSnapshot.of(
        {**LLM_STATS, **stats},
        time=0.0,
        alive=True,
        step_failures=0,
        requests_finished=0,
        requests_failed=0,
    )
    console = Console(width=120, record=True)
    console.print(render_panel(snap, Rates(0, 0, 0), {}, "serve", None, 1))
    assert "acceptance 75.0%  ·  4.00 tokens a step  ·  10 drafts" in console.export_text()


LLM_STATS = {
    "running": 0,
    "waiting": 0,
    "kv_blocks_used": 0,
    "kv_blocks_total": 1,
    "kv_blocks_cached": 0,
    "kv_blocks_shared": 0,
    "kv_blocks_saved": 0,
    "kv_blocks_forked": 0,
    "kv_blocks_copied": 0,
    "kv_cache_tokens": 16,
    "prefix_hit_rate": 0.0,
    "prompt_tokens": 0,
    "output_tokens": 0,
    "prompt_tok_s": 0.0,
    "generation_tok_s": 0.0,
    "batch_size": 0,
    "peak_batch_size": 0,
    "steps": 0,
    "batch_sequences": 0,
    "preemptions": 0,
}


def test_cli_flags(qwen3_tiny: Path):
    refused = run_cli("ask", "-m", str(qwen3_tiny), "--speculative", "draft", "hi")
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "speculative='draft' needs a draft model" in last
    inverted = run_cli(
        "ask",
        "-m",
        str(qwen3_tiny),
        "--speculative",
        "ngram",
        "--ngram-min",
        "4",
        "--ngram-max",
        "2",
        "hi",
    )
    assert inverted.returncode == 1 and "(4) must be <= " in inverted.stderr, inverted.stderr
    result = small_bench(
        qwen3_tiny,
        "--speculative",
        "ngram",
        "--num-speculative-tokens",
        "3",
        "--prompt-lookup-min",
        "1",
    )
    assert result["speculative"] == "ngram" and "spec_acceptance_rate" in result
