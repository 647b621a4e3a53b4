"""The OpenAI API's sampling features in the Python API: n choices forked off one prefill,
logprobs (sampled, top-N, prompt), penalties, logit_bias, min_tokens, best_of and
structured output, on the random-weight GPT-2 fixture."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from helpers import SMALL_KV, captured_logits, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.errors import InvalidRequestError

EOS = 50256
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(gpt2_tiny: Path) -> LLM:
    return LLM(str(gpt2_tiny), max_num_seqs=32, **SMALL_KV)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


# n choices ------------------------------------------------------------------------------


def test_n_choices_equal_separate_seeded_requests_and_share_the_prompt(llm: LLM):
    prompt = random_ids(21, seed=1)  # one full block of 16 and a partial one
    p = SamplingParams(temperature=1.0, top_k=40, seed=11, max_tokens=12, ignore_eos=True)
    before = llm.stats()
    result = llm.generate([prompt], SamplingParams(**{**_fields(p), "n": 4}))[0]
    after = llm.stats()
    assert [o["index"] for o in result["outputs"]] == [0, 1, 2, 3]
    assert result["token_ids"] == result["outputs"][0]["token_ids"]
    # The prompt was computed once; three choices shared its two blocks, then copied
    # the partial one on their first write.
    assert after["prompt_tokens"] - before["prompt_tokens"] == 21
    assert after["kv_blocks_forked"] - before["kv_blocks_forked"] == 3 * 2
    assert after["kv_blocks_copied"] - before["kv_blocks_copied"] == 3
    assert after["kv_blocks_used"] == 0
    for i, choice in enumerate(result["outputs"]):
        alone = llm.generate([prompt], SamplingParams(**{**_fields(p), "seed": 11 + i}))[0]
        assert choice["token_ids"] == alone["token_ids"], i
    assert len({tuple(o["token_ids"]) for o in result["outputs"]}) == 4
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, n=3))[0]
    assert len({tuple(o["token_ids"]) for o in greedy["outputs"]}) == 1


def _fields(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in p.__slots__ if not name.startswith("_")}


def test_forks_survive_preemption_and_look_ahead(gpt2_tiny: Path, llm: LLM):
    prompts = [random_ids(18, seed=s) for s in range(3)]
    params = [
        SamplingParams(temperature=0.9, seed=s, max_tokens=30, ignore_eos=True, n=3)
        for s in range(3)
    ]
    want = [[o["token_ids"] for o in r["outputs"]] for r in llm.generate(prompts, params)]
    # 14 blocks of 16 tokens: nine 48-token choices cannot all be resident.
    tight = LLM(str(gpt2_tiny), kv_cache_gb=14 * 16 * 2 * 2 * 64 * 4 / 2**30, max_model_len=64)
    got = [[o["token_ids"] for o in r["outputs"]] for r in tight.generate(prompts, params)]
    assert tight.stats()["preemptions"] > 0
    assert got == want
    ahead = LLM(str(gpt2_tiny), async_scheduling=True, **SMALL_KV)
    assert [[o["token_ids"] for o in r["outputs"]] for r in ahead.generate(prompts, params)] == want


def test_best_of_returns_the_choices_with_the_highest_mean_logprob(llm: LLM):
    prompt = random_ids(9, seed=4)
    base = {"temperature": 1.0, "seed": 5, "max_tokens": 8, "ignore_eos": True}
    ranked = llm.generate([prompt], SamplingParams(**base, n=2, best_of=4, logprobs=True))[0]
    every = llm.generate([prompt], SamplingParams(**base, n=4, logprobs=True))[0]["outputs"]
    best = sorted(every, key=lambda o: -np.mean(o["logprobs"]))[:2]
    assert [o["token_ids"] for o in ranked["outputs"]] == [o["token_ids"] for o in best]
    assert [o["index"] for o in ranked["outputs"]] == [0, 1]


# Logprobs -------------------------------------------------------------------------------


def test_top_logprobs_match_a_full_vocabulary_log_softmax(llm: LLM):
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, top_logprobs=5)
    other = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with captured_logits() as seen:
        out, _ = llm.generate(["The logprobs of", "a neighbour in the batch"], [p, other])
    assert len(seen) == 6 and len(out["top_logprobs"]) == 6
    for step, logits in enumerate(seen):
        ref = log_softmax(logits[0])
        top = out["top_logprobs"][step]
        assert list(top) == np.argsort(-ref)[:5].tolist()
        # float32 sums over the 50k-token vocabulary: ~1e-4 off a float64 reference
        np.testing.assert_allclose(list(top.values()), np.sort(ref)[::-1][:5], atol=2e-4)
        token = out["token_ids"][step]
        np.testing.assert_allclose(out["logprobs"][step], ref[token], atol=2e-4)


def test_prompt_logprobs_match_the_logits_after_each_prefix(gpt2_tiny: Path, llm: LLM):
    prompt = random_ids(12, seed=6)
    p = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    got = llm.generate([prompt], p)[0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(prompt)
    with captured_logits() as seen:
        llm.generate(
            [prompt[:k] for k in range(1, len(prompt))], SamplingParams(temperature=0, max_tokens=1)
        )
    refs = [log_softmax(row) for batch in seen for row in batch]
    for k, ref in enumerate(refs, start=1):
        entry = got[k]
        assert next(iter(entry)) == prompt[k]  # the prompt token first, then the top 3
        np.testing.assert_allclose(entry[prompt[k]], ref[prompt[k]], atol=2e-4)
        for t in np.argsort(-ref)[:3].tolist():
            assert t in entry
            np.testing.assert_allclose(entry[t], ref[t], atol=2e-4)
    # Again, chunked and after the prompt is in the prefix cache: every position is
    # still computed (no cached block may skip one), and the answer is the same.
    chunked = LLM(str(gpt2_tiny), max_num_batched_tokens=5, **SMALL_KV)
    chunked.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    again = chunked.generate([prompt], p)[0]
    assert again["num_cached_tokens"] == 0
    for a, b in zip(again["prompt_logprobs"][1:], got[1:]):
        assert list(a) == list(b)
        np.testing.assert_allclose(list(a.values()), list(b.values()), atol=2e-4)


# Penalties, logit_bias, min_tokens ------------------------------------------------------


def test_logit_bias_changes_the_greedy_token_as_computed_by_hand(llm: LLM):
    prompt = random_ids(7, seed=8)
    with captured_logits() as seen:
        plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    logits = seen[0][0]
    first, second = np.argsort(-logits)[:2].tolist()
    assert plain["token_ids"] == [first]
    lift = float(logits[first] - logits[second]) + 0.5
    lifted = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=1, logit_bias={second: lift})
    )
    assert lifted[0]["token_ids"] == [second]
    banned = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -1e9})
    )
    assert banned[0]["token_ids"] == [second]  # clamped to -100, which is plenty here


def test_penalties_change_the_greedy_tokens_as_computed_by_hand(llm: LLM):
    prompt = random_ids(5, seed=9) * 2
    # A bias that makes one token the greedy choice by a margin of 4, until penalised.
    favourite = 1000
    with captured_logits() as seen:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    bias = float(seen[0][0].max() - seen[0][0][favourite]) + 4.0
    base = {"temperature": 0, "max_tokens": 12, "ignore_eos": True, "logit_bias": {favourite: bias}}
    plain = llm.generate([prompt], SamplingParams(**base))[0]["token_ids"]
    assert plain[0] == favourite
    p = SamplingParams(**base, presence_penalty=0.7, frequency_penalty=1.5, repetition_penalty=1.3)
    with captured_logits() as seen:
        out = llm.generate([prompt], p)[0]["token_ids"]
    assert out != plain and out.count(favourite) > 1
    for step, logits in enumerate(seen):
        x = logits[0].astype(np.float64)
        history = out[:step]
        x[favourite] += bias  # logit_bias first, as vLLM
        for t in set(prompt + history):  # then transformers' repetition penalty
            x[t] = x[t] / 1.3 if x[t] > 0 else x[t] * 1.3
        for t in set(history):  # then OpenAI's presence and frequency penalties
            x[t] -= 1.5 * history.count(t) + 0.7
        assert out[step] == int(np.argmax(x)), step


def test_min_tokens_holds_eos_and_stop_ids_back(llm: LLM):
    eager = SamplingParams(temperature=0, max_tokens=20, logit_bias={EOS: 100})
    assert llm.generate(["Stop now"], eager)[0]["token_ids"] == [EOS]
    held = SamplingParams(temperature=0, max_tokens=20, logit_bias={EOS: 100}, min_tokens=5)
    out = llm.generate(["Stop now"], held)[0]
    assert len(out["token_ids"]) == 6 and out["token_ids"][-1] == EOS
    assert EOS not in out["token_ids"][:5] and out["finish_reason"] == "stop"
    stop_id = out["token_ids"][0]
    by_id = SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[stop_id], min_tokens=3)
    got = llm.generate(["Stop now"], by_id)[0]["token_ids"]
    assert stop_id not in got[:3]


# Structured output ----------------------------------------------------------------------


def test_json_schema_outputs_validate_while_free_requests_share_the_batch(llm: LLM):
    free = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) for _ in range(3)]
    free_prompts = ["Free text one", "Free text two", "Free text three"]
    alone = [o["token_ids"] for o in llm.generate(free_prompts, free)]
    constrained = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=120, json_schema=SCHEMA, n=2)
        for s in range(6)
    ]
    prompts = [f"Person {i} as JSON:" for i in range(6)]
    before = llm.stats()
    outs = llm.generate(prompts + free_prompts, constrained + free)
    assert llm.stats()["peak_batch_size"] >= 15
    assert llm.stats()["grammar_masks"] > before["grammar_masks"]
    for out in outs[:6]:
        for choice in out["outputs"]:
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["text"]), SCHEMA)
    assert [o["token_ids"] for o in outs[6:]] == alone


def test_regex_and_lark_grammar(llm: LLM):
    regex = SamplingParams(temperature=1.0, seed=2, max_tokens=30, regex=r"[0-9]{3}-[a-z]{2,4}")
    grammar = SamplingParams(temperature=1.0, seed=2, max_tokens=10, grammar='start: "yes" | "no"')
    a, b = llm.generate(["Code:", "Answer:"], [regex, grammar])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", a["text"]) and a["finish_reason"] == "stop"
    assert b["text"] in ("yes", "no") and b["finish_reason"] == "stop"


def test_a_schema_that_never_completes_ends_by_length(llm: LLM):
    endless = SamplingParams(
        temperature=1.0, seed=1, max_tokens=20, json_schema={"type": "array", "minItems": 10**9}
    )
    out = llm.generate(["List:"], endless)[0]
    assert out["finish_reason"] == "length" and out["text"].startswith("[")
    assert llm.stats()["kv_blocks_used"] == 0


# Adversarial input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 1000}, "n"),
        ({"n": 0}, "n"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: float("inf")}}, "logit_bias"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": [1]}, "json_schema"),
        ({"json_schema": {}, "regex": "a"}, "regex"),
        ({"regex": ""}, "regex"),
    ],
)
def test_bad_parameters_name_the_field(kwargs: dict, param: str):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {50257: 1.0}}, "logit_bias"),
        ({"n": 33}, "n"),  # more than max_num_seqs: the choices could never run together
        ({"json_schema": {"type": "string", "minLength": 5, "maxLength": 2}}, "json_schema"),
        ({"json_schema": {"type": "nonsense"}}, "json_schema"),
        ({"regex": "(unclosed"}, "regex"),
        ({"grammar": "start: undefined_rule"}, "grammar"),
    ],
)
def test_the_engine_refuses_what_the_model_cannot_do(llm: LLM, kwargs: dict, param: str):
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request("hi", SamplingParams(**kwargs))
    assert e.value.param == param
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_is_clamped_as_openai_does():
    assert SamplingParams(logit_bias={3: 1e6, 4: -1e6}).logit_bias == {3: 100.0, 4: -100.0}


def test_aborting_an_n4_request_frees_every_choice(llm: LLM):
    engine = llm.engine
    p = SamplingParams(temperature=1.0, max_tokens=200, ignore_eos=True, n=4)
    for steps in (0, 1, 5):  # before the prompt is computed, at the fork, mid-decode
        request_id = engine.add_request(random_ids(40, seed=steps), p)
        for _ in range(steps):
            engine.step()
        if steps == 5:
            assert llm.stats()["running"] == 4 and llm.stats()["kv_blocks_shared"] > 0
        ended = engine.abort_request(request_id)
        assert sorted(o.index for o in ended) == [0, 1, 2, 3]
        assert all(o.finish_reason == "abort" for o in ended) and ended[-1].request_finished
        stats = llm.stats()
        assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
        assert stats["kv_blocks_shared"] == stats["kv_blocks_saved"] == 0


def test_copy_blocks_copies_every_layer_and_reads_all_sources_first(llm: LLM):
    import mlx.core as mx

    runner = llm.engine.model_runner
    bs = runner.pool.block_size
    before = [np.array(c.k) for c in runner.caches]
    saved_v = [np.array(c.v) for c in runner.caches]
    for cache in runner.caches:  # blocks 3 and 5 get recognisable contents
        cache.k[:, 3 * bs : 4 * bs] = 1.0
        cache.k[:, 5 * bs : 6 * bs] = 2.0
    runner.copy_blocks([(3, 5), (5, 3), (3, 7)])  # a swap, and 3 copied again
    for cache, old, old_v in zip(runner.caches, before, saved_v):
        k = np.array(cache.k)
        assert (k[:, 5 * bs : 6 * bs] == 1.0).all() and (k[:, 3 * bs : 4 * bs] == 2.0).all()
        assert (k[:, 7 * bs : 8 * bs] == 1.0).all()
        np.testing.assert_array_equal(k[:, 8 * bs :], old[:, 8 * bs :])
        cache.k, cache.v = mx.array(old), mx.array(old_v)  # leave the engine as it was
