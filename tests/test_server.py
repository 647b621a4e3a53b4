"""The OpenAI-compatible server, run for real: uvicorn on a loopback port, official client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from helpers import JSON, MODEL, SMALL_KV, assert_error, metrics, serving, wait_for

from nanovllm_mlx.serving.app import ServerSettings, create_app

API_KEY = "test-key-123"


# Answers -----------------------------------------------------------------------------


def test_health_and_models(base_url: str, client: openai.OpenAI):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_answer(app, client: openai.OpenAI):
    messages = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(app.state.engine_thread.engine.tokenizer.encode_chat(messages))
    assert r.usage.prompt_tokens == prompt_tokens
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_completion_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    assert len(text) > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_completion_is_sse_ending_in_done(base_url: str, client: openai.OpenAI):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**body)
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


def test_completion_prompt_forms_and_logprobs(app, client: openai.OpenAI):
    text = "The quick brown fox"
    ids = app.state.engine_thread.engine.tokenizer.encode(text)
    answers = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
        for p in (text, ids, [text], [ids])
    ]
    assert len({a.choices[0].text for a in answers}) == 1
    assert all(a.usage.prompt_tokens == len(ids) for a in answers)
    r = client.completions.create(
        model=MODEL, prompt=text, max_tokens=6, temperature=0, logprobs=0, seed=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=4, logprobs=True
    )
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_32_concurrent_requests_share_the_batch(base_url: str, client: openai.OpenAI):
    before = metrics(base_url)

    def ask(i: int) -> openai.types.Completion:
        return client.completions.create(
            model=MODEL,
            prompt=f"Request number {i} says",
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len({a.id for a in answers}) == 32
    assert all(a.usage.completion_tokens == 24 for a in answers)
    assert all(a.choices[0].finish_reason == "length" for a in answers)
    after = metrics(base_url)
    steps = after["nanovllm_engine_steps_total"] - before["nanovllm_engine_steps_total"]
    seqs = (
        after["nanovllm_engine_step_sequences_total"]
        - before["nanovllm_engine_step_sequences_total"]
    )
    # 32 requests x 24 tokens one at a time would be >= 768 steps of one sequence each.
    assert seqs / steps > 1
    assert after["nanovllm_batch_size_peak"] > 1
    assert after['nanovllm_requests_finished_total{finish_reason="length"}'] >= 32


# Bad requests -------------------------------------------------------------------------

BAD_REQUESTS = [
    ("completions", '{"model": "gpt2-tiny", "prompt": "hi",', None),  # malformed JSON
    ("completions", "[1, 2]", None),  # not an object
    ("completions", {"max_tokens": 4}, "prompt"),  # missing prompt
    ("chat/completions", {"model": MODEL}, "messages"),  # missing messages
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": 42}, "prompt"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
    ("completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, None),
    ("completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("completions", {"prompt": "hello " * 600}, "prompt"),  # longer than the 512 context
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}, "messages"),
    ("completions", {"prompt": [1, 2, 10**9]}, "prompt"),  # not a token id: engine refuses
    ("completions", {"prompt": ["one", ""]}, "prompt"),  # one bad prompt of several
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1000}, "n"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD_REQUESTS)
def test_bad_request_is_400(base_url: str, endpoint: str, body, param: str | None):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        f"{base_url}/v1/{endpoint}",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert_error(r, 400, param)


def test_bad_requests_through_the_client(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as info:  # 404, as OpenAI's
        client.completions.create(model="no-such-model", prompt="hi")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1
        )
    assert info.value.body["type"] == "invalid_request_error"


def test_bad_requests_leave_others_running(base_url: str, client: openai.OpenAI):
    def stream() -> tuple[str, int]:
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt="A long story:",
                max_tokens=64,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        return chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        for endpoint, body, param in BAD_REQUESTS[:8]:
            content = body if isinstance(body, str) else json.dumps(body)
            r = httpx.post(f"{base_url}/v1/{endpoint}", content=content, headers=JSON, timeout=30)
            assert_error(r, 400, param)
        assert running.result(timeout=60) == ("length", 64)


# Disconnects and failures ----------------------------------------------------------------


def test_disconnect_mid_stream_frees_kv_blocks(base_url: str, client: openai.OpenAI):
    idle = metrics(base_url)
    assert idle["nanovllm_requests_running"] == 0
    stream = client.completions.create(
        model=MODEL,
        prompt="Tell me everything:",
        max_tokens=480,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    try:
        for _, _chunk in zip(range(5), stream):
            pass
        # /metrics reads a snapshot the engine publishes at most every PUBLISH_EVERY_S
        # (50 ms): five chunks may come out sooner than that.
        assert wait_for(
            lambda: metrics(base_url)["nanovllm_kv_blocks_used"] > idle["nanovllm_kv_blocks_used"]
        )
    finally:
        stream.close()  # a failure here must not leave the stream to the next test
    assert wait_for(
        lambda: metrics(base_url)["nanovllm_kv_blocks_used"] == idle["nanovllm_kv_blocks_used"]
    )
    after = metrics(base_url)
    assert after["nanovllm_requests_running"] == 0
    aborts = 'nanovllm_requests_finished_total{finish_reason="abort"}'
    assert after[aborts] == idle[aborts] + 1
    generated = after["nanovllm_generation_tokens_total"] - idle["nanovllm_generation_tokens_total"]
    assert generated < 480  # stopped early, not run to the end


def test_disconnect_while_waiting_for_a_non_streamed_answer(base_url: str):
    idle = metrics(base_url)
    body = {"model": MODEL, "prompt": "Go on:", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.1))
    aborts = 'nanovllm_requests_finished_total{finish_reason="abort"}'
    assert wait_for(lambda: metrics(base_url)[aborts] == idle[aborts] + 1)
    assert wait_for(
        lambda: metrics(base_url)["nanovllm_kv_blocks_used"] == idle["nanovllm_kv_blocks_used"]
    )


def test_engine_step_failure_is_a_500_and_serving_goes_on(app, client: openai.OpenAI, base_url):
    engine = app.state.engine_thread.engine
    real_step = engine._step

    def failing_step():
        engine._step = real_step  # fail once
        raise RuntimeError("injected step failure")

    engine._step = failing_step
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
        assert info.value.body["type"] == "server_error"
        engine._step = failing_step
        with pytest.raises(openai.APIError, match="injected"):
            list(client.completions.create(model=MODEL, prompt="hi", max_tokens=4, stream=True))
    finally:
        engine._step = real_step
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
    assert r.usage.completion_tokens >= 1
    after = metrics(base_url)
    assert after["nanovllm_engine_step_failures_total"] == 2
    assert after["nanovllm_kv_blocks_used"] == 0


# API key --------------------------------------------------------------------------------


def test_api_key_required_and_accepted(gpt2_tiny: Path):
    app = create_app(str(gpt2_tiny), ServerSettings(api_key=API_KEY), max_model_len=64, **SMALL_KV)
    with serving(app) as url:
        r = httpx.get(f"{url}/v1/models")
        error = r.json()["error"]
        assert r.status_code == 401 and error["code"] == "invalid_api_key"
        assert set(error) == {"message", "type", "param", "code"}
        # Refused before the body is even looked at.
        r = httpx.post(f"{url}/v1/completions", content="{not json")
        assert r.status_code == 401
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert httpx.get(f"{url}/health").status_code == 200
        # Everything else needs the key: metrics and the API's own description included.
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
        key = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.get(f"{url}/metrics", headers=key).status_code == 200
        assert httpx.get(f"{url}/openapi.json", headers=key).status_code == 200

        right = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        # No max_tokens: a chat answer runs to the end of the (64-token) context.
        r = right.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage.total_tokens == 64
