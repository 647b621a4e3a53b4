"""What real clients send or call beyond the basics: JSON null for "unset", the model by
id, 404 for an unknown model, vLLM's /tokenize and /detokenize, prompt_logprobs, and
completions logprobs=0."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from helpers import JSON, MODEL, assert_error

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize(
    "endpoint, body",
    [
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}),
        ("chat/completions", CHAT),
    ],
)
def test_null_means_unset(base_url: str, endpoint: str, body: dict):
    nulls = dict.fromkeys(
        [
            "stream",
            "stream_options",
            "logprobs",
            "echo",
            "ignore_eos",
            "stop",
            "n",
            "seed",
            "temperature",
            "response_format",
            "tools",
            "tool_choice",
            "user",
            "top_logprobs",
        ]
    )
    r = httpx.post(f"{base_url}/v1/{endpoint}", json={**body, **nulls}, headers=JSON, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_models_retrieve_and_unknown_model(base_url: str, client: openai.OpenAI):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found"
    r = httpx.post(f"{base_url}/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
    error = assert_error(r, 404, "model")
    assert error["code"] == "model_not_found"


def test_tokenize_and_detokenize(app, base_url: str):
    tokenizer = app.state.server.tokenizer
    r = httpx.post(f"{base_url}/tokenize", json={"prompt": "Hello world"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == 2
    assert body["max_model_len"] == app.state.server.max_model_len
    r = httpx.post(f"{base_url}/detokenize", json={"tokens": body["tokens"]}, timeout=30)
    assert r.json() == {"prompt": "Hello world"}
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{base_url}/tokenize", json={"model": MODEL, "messages": messages})
    assert r.json()["tokens"] == tokenizer.encode_chat(messages)
    assert_error(httpx.post(f"{base_url}/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_error(httpx.post(f"{base_url}/tokenize", json={}), 400)
    assert_error(httpx.post(f"{base_url}/tokenize", json={"prompt": "x", "model": "no"}), 404)


def test_prompt_logprobs_on_completions(app, base_url: str):
    ids = app.state.server.tokenizer.encode("The cat sat on the mat")
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, entry in zip(ids[1:], entries[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3  # the top 2 and the token
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2]
        assert all(
            e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in entry.values()
        )
    bad = {**body, "prompt_logprobs": -1}
    assert_error(httpx.post(f"{base_url}/v1/completions", json=bad), 400, "prompt_logprobs")
    plain = httpx.post(f"{base_url}/v1/completions", json={**body, "prompt_logprobs": None})
    assert "prompt_logprobs" not in plain.json()["choices"][0]


def test_completion_logprobs_zero_gives_the_sampled_token(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top == {token: value} and math.isfinite(value)
