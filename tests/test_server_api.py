"""The rest of the OpenAI API through the official client on a loopback server: n choices,
logprobs, echo, penalties and logit_bias, several prompts a request, structured output."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import numpy as np
import pytest
from helpers import MODEL, SMALL_KV, captured_logits, metrics, random_ids, serving, wait_for

from nanovllm_mlx import LLM, SamplingParams

# The same module-scoped server fixtures as test_server's (a server of this module's own).
FORKED = "nanovllm_kv_blocks_forked_total"
COPIED = "nanovllm_kv_blocks_copied_total"
ABORTS = 'nanovllm_requests_finished_total{finish_reason="abort"}'
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 10**7},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def greedy_chat(content: str, max_tokens: int, **extra: object) -> dict:
    """A greedy chat request of exactly max_tokens tokens, with logprobs."""
    return dict(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
        **extra,
    )


def test_n4_shares_the_prompt_and_equals_four_seeded_requests(base_url: str, client):
    prompt = random_ids(40, seed=2)  # two full blocks and a partial one
    kwargs = dict(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True}
    )
    before = metrics(base_url)
    r = client.completions.create(**kwargs, n=4, seed=100)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 40 and r.usage.completion_tokens == 40
    assert wait_for(lambda: metrics(base_url)[FORKED] == before[FORKED] + 3 * 3)
    after = metrics(base_url)
    assert after[COPIED] == before[COPIED] + 3
    assert after["nanovllm_prompt_tokens_total"] - before["nanovllm_prompt_tokens_total"] == 40
    for i, choice in enumerate(r.choices):
        alone = client.completions.create(**kwargs, seed=100 + i)
        assert choice.text == alone.choices[0].text, i
    chunks = list(client.completions.create(**kwargs, n=4, seed=100, stream=True))
    streamed = {i: "" for i in range(4)}
    for chunk in chunks:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(4)] == [c.text for c in r.choices]
    assert sum(1 for c in chunks if c.choices[0].finish_reason == "length") == 4


def test_cancelling_an_n4_stream_frees_every_choice(base_url: str, client):
    idle = metrics(base_url)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell four long stories. " * 3}],
        max_tokens=400,
        n=4,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    seen = set()
    for chunk in stream:
        seen |= {c.index for c in chunk.choices}
        if len(seen) == 4 and chunk.choices[0].delta.content:
            break
    # The metrics read a snapshot the engine thread refreshes every 50 ms while busy: one
    # taken just before this request was admitted can still be current here.
    assert wait_for(lambda: metrics(base_url)["nanovllm_requests_running"] == 4)
    busy = metrics(base_url)
    assert busy["nanovllm_kv_blocks_shared"] > 0 and busy["nanovllm_kv_blocks_saved"] > 0
    stream.close()
    assert wait_for(
        lambda: metrics(base_url)["nanovllm_kv_blocks_used"] == idle["nanovllm_kv_blocks_used"]
    )
    after = metrics(base_url)
    assert after["nanovllm_requests_running"] == 0 and after["nanovllm_kv_blocks_shared"] == 0
    assert after[ABORTS] == idle[ABORTS] + 1  # one request, whatever its choices


def test_chat_top_logprobs_match_a_full_log_softmax(app, client):
    tokenizer = app.state.engine_thread.engine.tokenizer
    with captured_logits() as seen:
        r = client.chat.completions.create(**greedy_chat("Spell it out.", 5, top_logprobs=5))
    content = r.choices[0].logprobs.content
    assert len(content) == len(seen) == 5
    for entry, logits in zip(content, seen):
        ref = log_softmax(logits[0])
        top = np.argsort(-ref)[:5]
        text = [tokenizer.decode([int(t)], skip_special_tokens=False) for t in top]
        assert [t.token for t in entry.top_logprobs] == text
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], ref[top], atol=2e-4)
        assert entry.token == text[0]  # greedy: the most likely token
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs_and_echo_for_scoring(app, client):
    text = "The quick brown fox jumps over"
    ids = app.state.engine_thread.engine.tokenizer.encode(text)
    score = client.completions.create(
        model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    choice = score.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert score.usage.completion_tokens == 0 and score.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == value and len(top) in (2, 3)  # the top 2, and the token
        assert max(top.values()) >= value
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    # Echo with generation: the prompt's part is the same, the completion follows.
    more = client.completions.create(
        model=MODEL, prompt=text, max_tokens=3, echo=True, logprobs=2, temperature=0
    )
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=3, temperature=0)
    assert more.choices[0].text == text + plain.choices[0].text
    assert more.choices[0].logprobs.token_logprobs[: len(ids)] == lp.token_logprobs
    assert len(more.choices[0].logprobs.tokens) == len(ids) + more.usage.completion_tokens
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=text, max_tokens=3, echo=True, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == more.choices[0].text


def test_several_prompts_run_as_one_batch_indexed_as_openai_does(client):
    prompts = ["One prompt", "Another prompt here", "A third"]
    kwargs = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=prompts, n=2, **kwargs)
    assert [c.index for c in r.choices] == list(range(6))
    alone = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    for i, a in enumerate(alone):
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == a.choices[0].text
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 6 * 6
    chunks = list(client.completions.create(prompt=prompts, n=2, stream=True, **kwargs))
    texts = {i: "" for i in range(6)}
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[i] for i in range(6)] == [c.text for c in r.choices]


def test_logit_bias_and_penalties_through_the_api(app, client, gpt2_tiny):
    tokenizer = app.state.engine_thread.engine.tokenizer
    (hello,) = tokenizer.encode(" hello")
    say = dict(model=MODEL, prompt="Say:", max_tokens=4, temperature=0)
    r = client.completions.create(**say, logit_bias={str(hello): 100})
    assert r.choices[0].text == " hello" * 4
    r = client.completions.create(**say, logit_bias={str(hello): -100})
    assert "hello" not in r.choices[0].text
    # The same parameters as the Python API takes them give the same tokens.
    fields = {
        "logit_bias": {hello: 3.0},
        "frequency_penalty": 1.2,
        "presence_penalty": 0.5,
        "repetition_penalty": 1.1,
        "min_tokens": 8,
    }
    extra = {"repetition_penalty": 1.1, "min_tokens": 8}  # vLLM's, not the client's
    body = {**fields, "logit_bias": {str(hello): 3.0}, "max_tokens": 12, "temperature": 0}
    for name in extra:
        del body[name]
    r = client.completions.create(model=MODEL, prompt="Say:", **body, extra_body=extra)
    llm = LLM(str(gpt2_tiny), **SMALL_KV)
    want = llm.generate("Say:", SamplingParams(temperature=0, max_tokens=12, **fields))[0]
    assert r.choices[0].text == want["text"]


def test_json_schema_outputs_validate_with_free_requests_in_the_same_batch(base_url: str, client):
    def constrained(i: int) -> list[str]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"City {i} as JSON"}],
            max_tokens=150,
            n=2,
            seed=i,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": SCHEMA},
            },
        )
        return [c.message.content for c in r.choices if c.finish_reason == "stop"]

    def free(i: int) -> str:
        r = client.completions.create(
            model=MODEL,
            prompt=f"Free {i}",
            max_tokens=30,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text

    expected = [free(i) for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        json_answers = pool.map(constrained, range(4))
        free_answers = pool.map(free, range(4))
        json_answers, free_answers = list(json_answers), list(free_answers)
    assert list(free_answers) == expected
    assert sum(len(a) for a in json_answers) == 8  # every choice completed its object
    for answer in json_answers:
        for content in answer:
            jsonschema.validate(json.loads(content), SCHEMA)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON!"}],
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a random model may nest objects past 60 tokens: still an object's start
        assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 65}, "n"),  # > max_num_seqs
        (
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
            "response_format",
        ),
    ],
)  # fmt: skip
def test_bad_chat_requests_name_the_field(base_url: str, body: dict, param: str):
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_streamed_logprobs_equal_the_whole_answers(client):
    kwargs = greedy_chat("Stream with logprobs.", 6, top_logprobs=2, n=2)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices[0].delta.role} == {0, 1}
    for choice in whole.choices:
        streamed = [
            entry
            for c in chunks
            if c.choices[0].index == choice.index and c.choices[0].logprobs
            for entry in c.choices[0].logprobs.content
        ]
        assert [e.model_dump() for e in streamed] == [
            e.model_dump() for e in choice.logprobs.content
        ]
        assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_admission_counts_every_choice_and_prompt(gpt2_tiny):
    from nanovllm_mlx.serving.app import ServerSettings, create_app

    app = create_app(str(gpt2_tiny), ServerSettings(max_waiting=3), max_model_len=64, **SMALL_KV)
    with serving(app) as url:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "n": 4}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        body = {"prompt": ["a", "b"], "n": 2, "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "n": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
