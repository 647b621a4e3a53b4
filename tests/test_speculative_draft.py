"""Draft-model speculative decoding on the engine: the same tokens as without it (greedy,
seeded sampling, logprobs) with the target itself as draft (every token accepted), a
noised copy of it (some accepted, some rejected) and another model of the same
tokenizer (almost none accepted); preemption, prefix hits, forks, stops, max_tokens,
sliding windows and the look-ahead; bad settings and mismatched drafts refused in one
line."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import (
    SMALL_KV,
    SPEC_PATTERNS,
    choice_ids,
    metrics_after_completion,
    run_cli,
    seeded_forks,
    serving,
    small_bench,
)

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.engine.core.speculation import DRAFT_COST, best_k
from nanovllm_mlx.errors import DraftModelError

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def drafting(target: Path, draft: Path, **kwargs: object) -> LLM:
    """An engine whose draft proposes at every step: the tiny models' draft forward costs
    what a target step does, so the honest adaptive k would never propose (that rule has
    its own test); here the mechanics are under test."""
    llm = LLM(
        str(target),
        speculative="draft",
        draft_model=str(draft),
        num_speculative_tokens=4,
        **{**SMALL_KV, **kwargs},  # type: ignore[arg-type]
    )
    assert llm.engine.speculator is not None
    llm.engine.speculator.cost = 0.0
    return llm


@pytest.fixture(scope="module")
def near_draft(qwen3_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen3-tiny with 5% noise on its matrices: ~40% of its draft tokens are accepted."""
    path = tmp_path_factory.mktemp("draft") / "qwen3-tiny-noised"
    shutil.copytree(qwen3_tiny, path)
    weights = mx.load(str(path / "model.safetensors"))
    assert isinstance(weights, dict)
    key = mx.random.key(1)
    for name, w in weights.items():
        if w.ndim == 2 and "embed" not in name:
            key, sub = mx.random.split(key)
            weights[name] = (w + 0.05 * w.std() * mx.random.normal(w.shape, key=sub)).astype(
                w.dtype
            )
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def plain(qwen3_tiny: Path) -> LLM:
    return LLM(str(qwen3_tiny), **SMALL_KV)


@pytest.fixture(scope="module")
def near(qwen3_tiny: Path, near_draft: Path) -> LLM:
    return drafting(qwen3_tiny, near_draft)


def rates(llm: LLM, before: dict) -> tuple[int, int]:
    after = llm.stats()
    return (
        after["spec_draft_tokens"] - before["spec_draft_tokens"],
        after["spec_accepted_tokens"] - before["spec_accepted_tokens"],
    )


@pytest.mark.parametrize("which", ["same", "near", "other"])
def test_greedy_batch_is_identical_whatever_the_draft(
    which: str, qwen3_tiny: Path, qwen2_tiny: Path, near_draft: Path, plain: LLM
):
    """Mixed requests (some with a penalty, which never speculate) give the tokens of the
    plain engine; the acceptance is what the draft's likeness to the target makes it."""
    draft = {"same": qwen3_tiny, "near": near_draft, "other": qwen2_tiny}[which]
    spec = drafting(qwen3_tiny, draft)
    params = [GREEDY, SamplingParams(**{**_fields(GREEDY), "repetition_penalty": 1.3})]
    mixed = [params[i % 3 == 2] for i in range(len(SPEC_PATTERNS))]
    assert choice_ids(spec.generate(SPEC_PATTERNS, mixed)) == choice_ids(
        plain.generate(SPEC_PATTERNS, mixed)
    )
    s = spec.stats()
    proposed, accepted = s["spec_draft_tokens"], s["spec_accepted_tokens"]
    assert s["speculative"] == "draft" and proposed > 100
    # Batched: fewer draft forwards than drafts (one per draft position for all).
    assert 0 < s["spec_draft_forwards"] < s["spec_drafts"]
    if which == "same":
        assert accepted == proposed and s["spec_tokens_per_step"] > 3
    elif which == "near":
        assert 0.1 < accepted / proposed < 0.9
    else:
        assert accepted / proposed < 0.1
    assert s["kv_blocks_used"] == 0


def _fields(p: SamplingParams) -> dict:
    return {"temperature": p.temperature, "max_tokens": p.max_tokens, "ignore_eos": True}


def test_seeded_sampling_forks_and_logprobs_are_identical(plain: LLM, near: LLM):
    params = seeded_forks()
    before = near.stats()
    prompts = [SPEC_PATTERNS[1], SPEC_PATTERNS[7]]
    got, want = near.generate(prompts, params), plain.generate(prompts, params)
    proposed, accepted = rates(near, before)
    assert 0 < accepted < proposed
    assert choice_ids(got) == choice_ids(want)
    for g, w in zip(got, want):
        for gc, wc in zip(g["outputs"], w["outputs"]):
            assert gc["logprobs"] == pytest.approx(wc["logprobs"], abs=1e-4)
            for gt, wt in zip(gc["top_logprobs"], wc["top_logprobs"]):
                assert list(gt) == list(wt)


def test_stops_and_max_tokens_inside_drafts(qwen3_tiny: Path, plain: LLM):
    """The target as its own draft accepts everything: every stop and length limit falls
    inside an accepted draft, and must end the output where the plain one ends."""
    spec = drafting(qwen3_tiny, qwen3_tiny)
    for prompt, ref in zip(SPEC_PATTERNS[:3], plain.generate(SPEC_PATTERNS[:3], GREEDY)):
        out = ref["token_ids"]
        for at in range(1, 12):
            cases = [
                SamplingParams(temperature=0.0, max_tokens=at, ignore_eos=True),
                SamplingParams(**_fields(GREEDY), stop_token_ids=[out[at]]),
            ]
            text = plain.tokenizer.decode(out[: at + 1])
            if text.strip():
                cases.append(SamplingParams(**_fields(GREEDY), stop=[text[-3:]]))
            for p in cases:
                got, want = spec.generate([prompt], p)[0], plain.generate([prompt], p)[0]
                assert got["token_ids"] == want["token_ids"], (at, p)
                assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
    assert spec.stats()["spec_acceptance_rate"] == 1.0


def test_preemption_and_prefix_hits(qwen3_tiny: Path, near_draft: Path, plain: LLM):
    """A pool of 20 blocks (the target's and the draft's K/V per block) holds ~4 of these
    sequences: preempted ones compute their draft K/V again, repeats hit the prefix
    cache, and a same-model draft still has every token accepted."""
    prompts = SPEC_PATTERNS + SPEC_PATTERNS[:4]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    want = choice_ids(plain.generate(prompts, params))
    per_block = 2 * (2 * 2 * 2 * 16 * 16 * 4)  # target + draft: 2 layers x K,V x 2 heads ...
    for draft, exact in ((qwen3_tiny, True), (near_draft, False)):
        tight = drafting(qwen3_tiny, draft, kv_cache_gb=20.5 * per_block / 2**30, max_model_len=128)
        assert tight.engine.block_manager.num_blocks == 20
        assert choice_ids(tight.generate(prompts, params)) == want
        s = tight.stats()
        assert s["preemptions"] > 0 and s["prefix_hit_tokens"] > 0 and s["kv_blocks_used"] == 0
        assert s["spec_acceptance_rate"] == 1.0 if exact else s["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("fixture", ["gemma3_tiny", "phi3_tiny"])
def test_sliding_windows(fixture: str, request: pytest.FixtureRequest):
    """Gemma 3's interleaved sliding layers and Phi-3's all-sliding ones, past their
    windows. Phi-3 frees the blocks that leave every window: the draft's first catch-up
    starts after them, its deeper layers' K/V without the context before (a known cost:
    fewer tokens accepted, the output unchanged)."""
    path = request.getfixturevalue(fixture)
    prompts = [p * 3 for p in SPEC_PATTERNS[:4]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=60, ignore_eos=True),
    ]
    mixed = [params[i % 2] for i in range(len(prompts))]
    want = choice_ids(LLM(str(path), **SMALL_KV).generate(prompts, mixed))
    spec = drafting(path, path)
    assert choice_ids(spec.generate(prompts, mixed)) == want
    s = spec.stats()
    assert s["spec_acceptance_rate"] > (0.9 if fixture == "gemma3_tiny" else 0.2)
    assert s["kv_blocks_used"] == 0


def test_look_ahead_and_compiled_decode(qwen3_tiny: Path, near_draft: Path, plain: LLM):
    fast = drafting(qwen3_tiny, near_draft, async_scheduling=True, compile_decode=True)
    params = [GREEDY, SamplingParams(temperature=0.7, seed=3, max_tokens=40, ignore_eos=True)]
    mixed = [params[i % 2] for i in range(len(SPEC_PATTERNS))]
    assert choice_ids(fast.generate(SPEC_PATTERNS, mixed)) == choice_ids(
        plain.generate(SPEC_PATTERNS, mixed)
    )
    assert fast.stats()["spec_accepted_tokens"] > 0


def test_adaptive_k_counts_the_draft_forward(qwen3_tiny: Path, plain: LLM):
    """A draft as large as the target costs a target step per token: never worth it, so
    the engine's own rule proposes nothing (DRAFT_COST + the weights' ratio, 1.0)."""
    assert best_k(0.99, 4, cost=DRAFT_COST + 1.0) == 0
    assert best_k(0.9, 4, cost=DRAFT_COST + 0.1) == 4
    spec = LLM(str(qwen3_tiny), speculative="draft", draft_model=str(qwen3_tiny), **SMALL_KV)
    assert spec.engine.speculator is not None
    assert spec.engine.speculator.cost == pytest.approx(DRAFT_COST + 1.0)
    assert choice_ids(spec.generate(SPEC_PATTERNS[:3], GREEDY)) == choice_ids(
        plain.generate(SPEC_PATTERNS[:3], GREEDY)
    )
    assert spec.stats()["spec_drafts"] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speculative": "draft"}, "needs a draft model"),
        ({"speculative": "draft", "draft_model": ""}, "needs a draft model"),
        ({"draft_model": "x"}, r"draft_model needs speculative='draft'$"),
        ({"speculative": "ngram", "draft_model": "x"}, "not 'ngram'"),
        ({"speculative": "draft", "draft_model": "x", "prompt_lookup_min": 2}, "applies to"),
        ({"speculative": "draft", "draft_model": "x", "tensor_parallel_size": 2}, "not sharded"),
        ({"speculative": "draft", "draft_model": "x", "num_speculative_tokens": 0}, r"\[1, 64\]"),
    ],
)
def test_bad_settings_are_one_line_errors(gpt2_tiny: Path, kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message) as e:
        LLM(str(gpt2_tiny), **kwargs, **SMALL_KV)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        ("gpt2_tiny", "vocabulary of 50,257 tokens, qwen3-tiny of 50,304"),
        ("llama_q4_tiny", "tokenizer differs from qwen3-tiny's"),
        ("qwen35_tiny", "recurrent state"),
    ],
)
def test_mismatched_drafts_are_refused(
    qwen3_tiny: Path, draft: str, message: str, request: pytest.FixtureRequest
):
    path = request.getfixturevalue(draft)
    with pytest.raises(DraftModelError, match=message):
        LLM(str(qwen3_tiny), speculative="draft", draft_model=str(path), **SMALL_KV)


def test_recurrent_targets_are_refused(qwen35_tiny: Path):
    with pytest.raises(ValueError, match="recurrent state"):
        LLM(str(qwen35_tiny), speculative="draft", draft_model=str(qwen35_tiny), **SMALL_KV)


def test_cli(qwen3_tiny: Path, qwen2_tiny: Path):
    for args, message in (
        (["--speculative", "draft"], "needs a draft model: give --draft-model"),
        (["--draft-model", str(qwen2_tiny)], "--draft-model needs speculative='draft'"),
    ):
        refused = run_cli("ask", "-m", str(qwen3_tiny), *args, "hi")
        last = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 1 and last.startswith("error: ") and message in last, last
    result = small_bench(qwen3_tiny, "--speculative", "draft", "--draft-model", str(qwen2_tiny))
    assert result["speculative"] == "draft" and "spec_acceptance_rate" in result


def test_served_with_metrics(qwen3_tiny: Path, near_draft: Path):
    """Served: the draft's counters reach /metrics."""
    from nanovllm_mlx.serving.app import create_app

    engine = drafting(qwen3_tiny, near_draft).engine
    with serving(create_app(engine)) as base_url:
        m = metrics_after_completion(base_url, SPEC_PATTERNS[0], "qwen3-tiny")
    proposed = m["nanovllm_spec_decode_num_draft_tokens_total"]
    assert 0 < m["nanovllm_spec_decode_num_accepted_tokens_total"] < proposed
