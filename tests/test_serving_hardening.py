"""The server as an adversary sees it: oversized, mistyped, foreign-host and malformed
requests, a full waiting queue, a request timeout. Each is one OpenAI-style error, and the
server goes on serving."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from helpers import JSON, MODEL, assert_error, metrics, serving, wait_for

from nanovllm_mlx.serving import guard
from nanovllm_mlx.serving.app import ServerSettings, create_app
from nanovllm_mlx.serving.settings import LOOPBACK_HOSTS

MAX_BODY = 64 * 1024
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def app(gpt2_tiny: Path):
    settings = ServerSettings(allowed_hosts=LOOPBACK_HOSTS, max_body_bytes=MAX_BODY)
    return create_app(str(gpt2_tiny), settings, kv_cache_gb=0.05)


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


def raw_exchange(url: str, head: bytes, chunks: Iterator[bytes]) -> bytes:
    """Send head, then chunks until the server answers; return what it answered."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed meanwhile
                break
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + 10:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# Body size --------------------------------------------------------------------------------


def test_declared_oversized_body_is_413_before_it_is_sent(base_url: str):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{"
    )
    start = time.monotonic()
    answer = raw_exchange(base_url, head, iter(()))
    assert status_of(answer) == 413
    assert time.monotonic() - start < 5
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"\r\n0\r\n")[0] or b"{}")
    assert body["error"]["type"] == "invalid_request_error"


def test_chunked_oversized_body_is_413_while_it_is_read(base_url: str):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 8192
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(10_000):  # 80 MB if nobody stopped us
            sent.append(len(chunk))
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)

    answer = raw_exchange(base_url, head, chunks())
    assert status_of(answer) == 413
    assert sum(sent) < 50 * MAX_BODY  # refused at the limit, not after the whole body
    assert httpx.get(f"{base_url}/health").status_code == 200


# Content type and Host ---------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_post_that_is_not_json_is_415(base_url: str, content_type: str | None):
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    r = httpx.post(f"{base_url}/v1/completions", content=body, headers=headers)
    assert_error(r, 415)


def test_json_with_charset_is_accepted(base_url: str):
    headers = {"Content-Type": "application/json; charset=utf-8"}
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    assert httpx.post(f"{base_url}/v1/completions", content=body, headers=headers).is_success


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:8000", "10.0.0.1", ""])
def test_foreign_host_is_refused(base_url: str, host: str):
    for path in ("/health", "/v1/models"):
        r = httpx.get(f"{base_url}{path}", headers={"Host": host})
        assert_error(r, 421)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1:9", "[::1]:8000"])
def test_loopback_hosts_are_served(base_url: str, host: str):
    assert httpx.get(f"{base_url}/v1/models", headers={"Host": host}).status_code == 200


# 400s -----------------------------------------------------------------------------------

BAD = [
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {}}}, None),
    ({"prompt": "hi", "stop_token_ids": [50257]}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "max_tokens": 10**400}, "max_tokens"),
    ({"prompt": "hi", "seed": 10**400}, "seed"),
    ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ({"prompt": "hi", "top_k": 10**30}, "top_k"),
    ('{"prompt": "hi", "temperature": 1e400}', "temperature"),  # JSON's infinity
    ('{"prompt": "hi", "max_tokens": 1' + "0" * 5000 + "}", None),  # past int() digits
    ({"prompt": "hi", "max_tokens": 5.0}, "max_tokens"),
    ({"prompt": "hi", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": "hi", "stop": ["."] * 100}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "echo": True, "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"prompt": "hi", "presence_penalty": -3}, "presence_penalty"),
    ({"prompt": "hi", "logit_bias": {"the": 5}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"50257": 5}}, "logit_bias"),  # outside the vocabulary
    ({"prompt": "hi", "logit_bias": {"-1": 5}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": "x"}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
    ({"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "hi", "n": 129}, "n"),
    ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "hi", "n": 1, "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"),
    ({"prompt": ["a"] * 300}, "prompt"),  # more sequences than the server queues
    (
        {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}},
        "response_format",
    ),  # unsatisfiable: llguidance says so
    (
        {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "wrong"}}}},
        "response_format",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD)
def test_bad_completion_is_400(base_url: str, body: dict | str, param: str | None):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{base_url}/v1/completions", content=content, headers=JSON, timeout=30)
    assert_error(r, 400, param)


@pytest.mark.parametrize(
    "body",
    ["{", "", "null", '"text"', "[]", '{"messages": [{"role": "user", "content": 5}]}',
     '{"messages": []}', "\xff\xfe"],
)  # fmt: skip
def test_garbage_json_is_400(base_url: str, body: str):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=body.encode("latin-1"), headers=JSON)
    assert_error(r, 400)


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "where"),
    [
        ("completions", {"prompt": "hello " * 100, "max_tokens": 450}, "max_tokens", "prompt"),
        ("chat/completions", {**CHAT, "max_tokens": 600}, "max_tokens", "messages"),
        ("chat/completions", {**CHAT, "max_completion_tokens": 600}, "max_completion_tokens",
         "messages"),
    ],
)  # fmt: skip
def test_max_tokens_beyond_the_context_is_400(
    base_url: str, endpoint: str, body: dict, param: str, where: str
):
    error = assert_error(httpx.post(f"{base_url}/v1/{endpoint}", json=body), 400, param)
    assert error["code"] == "context_length_exceeded"
    message = error["message"]
    assert message.startswith("This model's maximum context length is 512 tokens.")
    assert f"in the {where}, {body.get('max_tokens') or body['max_completion_tokens']} in the " \
        "completion" in message  # fmt: skip


def test_chat_without_max_tokens_takes_the_rest_of_the_context(base_url: str):
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={**CHAT, "messages": [{"role": "user", "content": "hello " * 400}],
              "ignore_eos": True},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == 512


def test_openapi_documents_the_request_bodies(base_url: str):
    spec = httpx.get(f"{base_url}/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    schema = spec["components"]["schemas"]["CompletionRequest"]
    assert {"prompt", "max_tokens", "stream", "stop"} <= set(schema["properties"])
    assert httpx.get(f"{base_url}/docs").status_code == 200


def test_json_and_tokenization_stay_off_the_event_loop(app, base_url: str, monkeypatch):
    threads: list[str] = []
    real_loads, tokenizer = json.loads, app.state.server.tokenizer
    real_encode = tokenizer.encode_text

    class Recording:
        @staticmethod
        def loads(data: bytes) -> object:
            threads.append(threading.current_thread().name)
            return real_loads(data)

    def encode_text(chat_text: str) -> list[int]:
        threads.append(threading.current_thread().name)
        return real_encode(chat_text)

    monkeypatch.setattr(guard, "json", Recording)
    monkeypatch.setattr(tokenizer, "encode_text", encode_text)
    r = httpx.post(f"{base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert r.status_code == 200
    assert len(threads) == 2 and "MainThread" not in threads
    assert all(t == threads[0] or t.startswith("AnyIO") for t in threads)


def test_rejections_are_counted(base_url: str):
    before = metrics(base_url).get('nanovllm_requests_rejected_total{status="415"}', 0)
    httpx.post(f"{base_url}/v1/completions", content="{}")
    after = metrics(base_url)['nanovllm_requests_rejected_total{status="415"}']
    assert after == before + 1


# Admission and timeouts ----------------------------------------------------------------------


def test_full_queue_is_503_with_retry_after(gpt2_tiny: Path):
    settings = ServerSettings(max_waiting=1)
    app = create_app(str(gpt2_tiny), settings, kv_cache_gb=0.05, max_num_seqs=1)
    engine = app.state.engine_thread.engine
    real_step = engine._step

    def slow_step() -> list | None:
        time.sleep(0.02)  # 480 tokens take ~10 s: the queue stays full while we look
        return real_step()

    engine._step = slow_step
    long = {"prompt": "Go on:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # running, and holding the only batch slot
            with http.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200
                assert wait_for(lambda: metrics(url)["nanovllm_requests_waiting"] == 1)
                r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "server_error"
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.InternalServerError):
                    client.chat.completions.create(model=MODEL, **CHAT, max_tokens=2)
        assert wait_for(lambda: metrics(url)["nanovllm_requests_running"] == 0)
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).is_success
        assert metrics(url)['nanovllm_requests_rejected_total{status="503"}'] == 2


def test_request_timeout_is_504_or_an_error_event(gpt2_tiny: Path):
    app = create_app(str(gpt2_tiny), ServerSettings(request_timeout=0.3), kv_cache_gb=0.05)
    long = {"prompt": "Go on:", "max_tokens": 500, "ignore_eos": True}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/completions", json=long)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "request_timeout"
        with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
        m = metrics(url)
        assert m['nanovllm_requests_finished_total{finish_reason="timeout"}'] == 2
        assert wait_for(lambda: metrics(url)["nanovllm_kv_blocks_used"] == 0)
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).is_success
