"""The engine end to end on random-weight GPT-2 checkpoints in the Hub's real layouts."""

import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import SMALL_KV, check_parity

from nanovllm_mlx import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(gpt2_tiny: Path) -> LLM:
    return LLM(str(gpt2_tiny), max_num_seqs=64, **SMALL_KV)


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50000, rng.integers(lo, hi)).tolist() for _ in range(n)]


@pytest.mark.parametrize("layout", ["gpt2_tiny", "gpt2_tiny_hf5", "gpt2_tiny_sharded"])
def test_logits_match_transformers_for_prefill_and_every_decode_step(
    layout: str, request: pytest.FixtureRequest
):
    prompt = [464, 3139, 1748, 286, 4881, 318, 257, 1295, 11, 290, 340]
    check_parity(request.getfixturevalue(layout), prompt, steps=GREEDY.max_tokens)


def test_batched_greedy_equals_each_prompt_alone(llm: LLM):
    prompts = random_prompts(36)
    params = [
        SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True)
        for n in np.random.default_rng(1).integers(1, 24, len(prompts))
    ]
    together = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        alone = llm.generate([prompt], p)[0]
        assert out["token_ids"] == alone["token_ids"]
        assert len(out["token_ids"]) == p.max_tokens and out["finish_reason"] == "length"


def test_shared_prefix_reuses_cached_blocks(gpt2_tiny: Path):
    prefix = random_prompts(1, seed=3, lo=200, hi=201)[0]
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    cold = LLM(str(gpt2_tiny), enable_prefix_caching=False, **SMALL_KV)
    expected = cold.generate([second], GREEDY)[0]["token_ids"]

    warm = LLM(str(gpt2_tiny), **SMALL_KV)
    warm.generate([first], GREEDY)
    before = warm.stats()["prompt_tokens"]
    out = warm.generate([second], GREEDY)[0]
    prefilled = warm.stats()["prompt_tokens"] - before
    block = warm.stats()["block_size"]
    assert out["num_cached_tokens"] == len(prefix) // block * block
    assert prefilled == len(second) - out["num_cached_tokens"]
    assert out["token_ids"] == expected
    assert warm.stats()["prefix_hit_rate"] > 0


def test_small_kv_pool_preempts_and_still_gives_the_same_outputs(gpt2_tiny: Path, llm: LLM):
    prompts = random_prompts(12, seed=4, lo=20, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [o["token_ids"] for o in llm.generate(prompts, params)]
    # 24 blocks of 16 tokens hold ~5 of these 80-token sequences at once.
    tight = LLM(str(gpt2_tiny), kv_cache_gb=24 * 16 * 2 * 2 * 64 * 4 / 2**30, max_model_len=128)
    assert tight.engine.block_manager.num_blocks == 24
    got = [o["token_ids"] for o in tight.generate(prompts, params)]
    assert tight.stats()["preemptions"] > 0
    assert got == expected


def test_chunked_prefill_gives_the_same_outputs(gpt2_tiny: Path, llm: LLM):
    prompts = random_prompts(6, seed=5, lo=40, hi=120)
    expected = [o["token_ids"] for o in llm.generate(prompts, GREEDY)]
    chunked = LLM(str(gpt2_tiny), max_num_batched_tokens=32, **SMALL_KV)
    assert [o["token_ids"] for o in chunked.generate(prompts, GREEDY)] == expected


def test_outputs_come_back_in_input_order_with_text(llm: LLM):
    outs = llm.generate(["Hello world", [464, 3139], "The capital"], GREEDY)
    assert len(outs) == 3
    for out in outs:
        assert out["text"] == llm.tokenizer.decode(out["token_ids"])
    assert outs[1]["token_ids"] == llm.generate([[464, 3139]], GREEDY)[0]["token_ids"]


def test_stream_deltas_add_up_to_the_generated_text(llm: LLM):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    deltas = list(llm.stream("Once upon a time", params))
    assert "".join(deltas) == llm.generate(["Once upon a time"], params)[0]["text"]
    assert all("\ufffd" not in d for d in deltas[:-1]) or "\ufffd" in "".join(deltas)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm: LLM):
    p = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True
    )
    alone = llm.generate(["Seeded"], p)[0]["token_ids"]
    mixed = llm.generate(
        ["Seeded", "Other", "Third"], [p, SamplingParams(temperature=0.7, max_tokens=5), GREEDY]
    )
    assert mixed[0]["token_ids"] == alone
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate(["Seeded"], other_seed)[0]["token_ids"] != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm: LLM):
    greedy = llm.generate(["Some text"], GREEDY)[0]["token_ids"]
    for p in (
        SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.5, min_p=1.0, max_tokens=12, ignore_eos=True),
    ):
        assert llm.generate(["Some text"], p)[0]["token_ids"] == greedy


def test_sampling_follows_the_distribution(llm: LLM):
    # With temperature 1 the first token's empirical frequencies track softmax(logits).
    import nanovllm_mlx.engine.sample.sampler as sampler
    from nanovllm_mlx.engine.core.sequence import Sequence

    logits = mx.array([[2.0, 1.0, 0.0, -1.0]] * 4000)
    seqs = [Sequence(i, [0], SamplingParams(temperature=1.0)) for i in range(4000)]
    tokens, _ = sampler.sample(logits, seqs)
    freq = np.bincount(np.array(tokens), minlength=4) / 4000
    expected = np.exp([2.0, 1.0, 0.0, -1.0]) / np.exp([2.0, 1.0, 0.0, -1.0]).sum()
    np.testing.assert_allclose(freq, expected, atol=0.03)
    # probs are [0.64, 0.24, 0.09, 0.03]: each filter keeps exactly the expected tokens,
    # rows with different filters side by side in one batch.
    filters = [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.5}, {0}),
        ({"top_p": 0.8}, {0, 1}),
        ({"top_p": 0.95}, {0, 1, 2}),
        ({"min_p": 0.3}, {0, 1}),
        ({"top_k": 3}, {0, 1, 2}),
    ]
    seqs = [
        Sequence(i, [0], SamplingParams(temperature=1.0, **filters[i % len(filters)][0]))
        for i in range(1200)
    ]
    tokens, _ = sampler.sample(logits[:1200], seqs)
    tokens = np.array(tokens)
    for j, (_, allowed) in enumerate(filters):
        assert set(tokens[j :: len(filters)].tolist()) == allowed


def test_repetition_penalty_discourages_repeats(llm: LLM):
    plain = llm.generate(
        ["a a a a a a"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    )[0]["token_ids"]
    penalized = llm.generate(
        ["a a a a a a"],
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=100.0),
    )[0]
    ids = penalized["token_ids"]
    assert len(set(ids)) > len(set(plain)) or len(set(ids)) == len(ids)


def test_stop_strings_truncate_text_and_are_never_streamed(llm: LLM):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = llm.generate(["The"], params)[0]["text"]
    stop = full[10:14]
    assert len(stop) == 4
    stopped = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
    out = llm.generate(["The"], stopped)[0]
    assert out["text"] == full[: full.index(stop)] and out["finish_reason"] == "stop"
    deltas = list(llm.stream("The", stopped))
    assert "".join(deltas) == out["text"]


def test_stop_token_ids_and_eos(llm: LLM):
    greedy = llm.generate(["Hi"], GREEDY)[0]["token_ids"]
    out = llm.generate(
        ["Hi"], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[greedy[3]])
    )[0]
    assert out["token_ids"] == greedy[: greedy.index(greedy[3]) + 1]
    assert out["finish_reason"] == "stop"


def test_stats(llm: LLM):
    llm.generate(["Hello"], GREEDY)
    stats = llm.stats()
    for key in (
        "running",
        "waiting",
        "batch_size",
        "kv_blocks_used",
        "kv_blocks_total",
        "prefix_hit_rate",
        "prompt_tok_s",
        "generation_tok_s",
        "preemptions",
    ):
        assert key in stats
    assert stats["running"] == stats["waiting"] == 0 and stats["kv_blocks_used"] == 0
    assert stats["output_tokens"] > 0


# Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_sampling_params_are_clear_errors(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_without_disturbing_the_batch(llm: LLM):
    engine = llm.engine
    prompts = random_prompts(4, seed=8)
    expected = [o["token_ids"] for o in llm.generate(prompts, GREEDY)]
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    results: dict[str, list[int]] = {i: [] for i in ids}
    for out in engine.step() + engine.step():
        results[out.request_id] += out.token_ids
    for bad, message in [
        ("", "empty"),
        ([], "non-empty"),
        ([1, 2, 99999999], "token id"),
        ([1, "x"], "token id"),
        (list(range(600)), "context"),
        (None, "prompt"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.add_request(bad, GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], GREEDY, request_id=ids[0])
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] += out.token_ids
    assert [results[i] for i in ids] == expected
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(["fine", ""], GREEDY)
    assert not engine.has_unfinished_requests()


def test_abort_frees_blocks_and_leaves_others_alone(llm: LLM):
    engine = llm.engine
    a = engine.add_request([1, 2, 3], GREEDY)
    b = engine.add_request([4, 5, 6], GREEDY)
    engine.step()
    engine.abort_request(a)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert {o.request_id for o in outs} == {b}
    assert llm.stats()["kv_blocks_used"] == 0


def test_missing_model_dir(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found|does not exist"):
        LLM(str(tmp_path / "nope"))


def test_model_dir_without_weights(gpt2_no_weights: Path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(gpt2_no_weights), **SMALL_KV)


def test_model_dir_without_config(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path), **SMALL_KV)


def test_corrupt_safetensors(gpt2_corrupt: Path):
    with pytest.raises(ValueError, match="corrupt or truncated"):
        LLM(str(gpt2_corrupt), **SMALL_KV)


def test_bad_engine_options(gpt2_tiny: Path):
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(str(gpt2_tiny), max_batch=3)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(str(gpt2_tiny), max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_gb"):
        LLM(str(gpt2_tiny), kv_cache_gb=1e-6)


def test_async_scheduling_gives_the_same_outputs(gpt2_tiny: Path):
    # 20 sequences: the CPU decode batch is read in length groups, launched ahead too.
    prompts = random_prompts(20, seed=3)
    params = [
        SamplingParams(
            temperature=0.0 if i % 3 else 0.8,
            seed=i,
            max_tokens=5 + 3 * i,
            stop=["e"] if i % 4 == 0 else [],
        )
        for i in range(20)
    ]
    results = {}
    for flag in (False, True):
        # A fixed step budget: the default is measured at start-up, and a different one
        # gives the aborted request a different number of tokens by step 8.
        engine = LLM(
            str(gpt2_tiny), async_scheduling=flag, max_num_batched_tokens=256, **SMALL_KV
        ).engine
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        outs: dict[str, list] = {i: [] for i in ids}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[out.request_id].append((out.token_ids, out.text, out.finish_reason))
            steps += 1
            if steps == 8:
                engine.abort_request(ids[-1])  # changes the batch under a launched step
        results[flag] = [outs[i] for i in ids]
        stats = engine.stats()
        if flag:
            assert stats["steps_ahead_used"] > 10 and stats["steps_ahead_dropped"] >= 1
        else:
            assert stats["steps_ahead_used"] == stats["steps_ahead_dropped"] == 0
        assert stats["kv_blocks_used"] == 0
    assert results[True] == results[False]


# Isolation: one request never fails the others ----------------------------------------


def test_a_request_that_fails_the_step_fails_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch):
    import nanovllm_mlx.engine.runner.model_runner as model_runner

    prompts = random_prompts(7, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = [o["token_ids"] for o in llm.generate(prompts, params)]
    # A fault tied to one sequence: sampling any batch holding it raises once it has
    # 3 tokens. The engine must find it by retrying halves and fail it alone.
    poison = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, seed=666)
    real = model_runner.sample

    def sample(logits, seqs, *args):
        if any(s.params.seed == 666 and s.num_output_tokens >= 3 for s in seqs):
            raise RuntimeError("injected fault")
        return real(logits, seqs, *args)

    monkeypatch.setattr(model_runner, "sample", sample)
    ids = llm.engine.add_requests(
        prompts[:4] + [prompts[0]] + prompts[4:], [params] * 4 + [poison] + [params] * 3
    )
    seen = [out for step in llm.engine.iterate(ids) for out in step]
    # Every request ends with exactly one finished output, the failed one included.
    assert sorted(out.request_id for out in seen if out.finished) == sorted(ids)
    outs = llm.generate(
        prompts[:4] + [prompts[0]] + prompts[4:], [params] * 4 + [poison] + [params] * 3
    )
    bad = outs.pop(4)
    assert bad["finish_reason"] == "error" and "injected fault" in bad["error"]
    assert len(bad["token_ids"]) == 3
    assert [o["token_ids"] for o in outs] == expected
    assert all(o["finish_reason"] == "length" and o["error"] is None for o in outs)
    stats = llm.stats()
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0


def test_top_k_beyond_the_vocabulary_is_clamped(llm: LLM):
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    huge = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, top_k=10**6)
    want = llm.generate(["Hello"], sampled)[0]["token_ids"]
    assert llm.generate(["Hello"], huge)[0]["token_ids"] == want
    assert huge.top_k == 10**6  # the caller's params are not modified


def test_stop_token_ids_outside_the_vocabulary_are_refused(llm: LLM):
    with pytest.raises(ValueError, match="stop_token_ids") as e:
        llm.engine.add_request("hi", SamplingParams(stop_token_ids=[llm.engine.vocab_size]))
    assert e.value.param == "stop_token_ids"
    assert not llm.engine.has_unfinished_requests()


def test_max_tokens_none_is_the_rest_of_the_context_and_more_is_cut_to_it(gpt2_tiny: Path):
    llm = LLM(str(gpt2_tiny), max_model_len=32, **SMALL_KV)
    prompt = list(range(100, 110))
    greedy = {"temperature": 0.0, "ignore_eos": True}
    rest, over, held = llm.generate(
        [prompt] * 3,
        [
            SamplingParams(max_tokens=None, **greedy),
            SamplingParams(max_tokens=500, **greedy),
            SamplingParams(max_tokens=None, min_tokens=400, **greedy),  # cut with it
        ],
    )
    assert rest["finish_reason"] == over["finish_reason"] == held["finish_reason"] == "length"
    assert len(rest["token_ids"]) == 22 and over["token_ids"] == rest["token_ids"]
    assert len(held["token_ids"]) == 22


def test_start_up_phases_account_for_the_engines_construction(gpt2_tiny: Path):
    t0 = time.perf_counter()
    engine = LLM(str(gpt2_tiny), **SMALL_KV)
    wall = time.perf_counter() - t0
    phases = engine.stats()["startup_s"]
    assert {"load", "pool", "budget"} <= set(phases) and min(phases.values()) >= 0
    assert 0.5 * wall <= sum(phases.values()) <= wall  # the phases are the construction
