"""Abandoned requests cost nothing after they are abandoned: a request whose client leaves
before the engine took it is never added, one that is queued or running is aborted at the
next step boundary, and a storm of them leaves no request, queue entry or KV block behind."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from urllib.parse import urlsplit

import httpx
from helpers import metrics, wait_for

# The same module-scoped server fixtures as test_server's (a server of this module's own).
ABORTS = 'nanovllm_requests_finished_total{finish_reason="abort"}'


async def abandon(url: str, path: str, body: dict, after: float) -> None:
    """Send a request, then hang up after `after` seconds whatever came back."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    await asyncio.sleep(after)
    writer.close()


def storm(url: str, n: int, seconds: float) -> None:
    rng = random.Random(0)
    bodies = [
        ("/v1/completions", {"prompt": f"Storm {i}:", "max_tokens": 400, "ignore_eos": True})
        if i % 2
        else (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": f"Storm {i}"}], "max_tokens": 400,
             "ignore_eos": True, "stream": bool(i % 4)},
        )
        for i in range(n)
    ]  # fmt: skip

    async def main() -> None:
        await asyncio.gather(
            *(abandon(url, path, body, rng.uniform(0, seconds)) for path, body in bodies)
        )

    asyncio.run(main())


def test_storm_of_abandoned_requests_leaves_nothing_behind(base_url: str):
    before = metrics(base_url)
    storm(base_url, 150, 0.3)

    def idle() -> bool:
        m = metrics(base_url)
        return (m["nanovllm_requests_running"], m["nanovllm_requests_waiting"],
                m["nanovllm_kv_blocks_used"]) == (0, 0, 0)  # fmt: skip

    assert wait_for(idle, timeout=30)
    after = metrics(base_url)
    # Every request that reached the engine side was aborted, none ran to its end.
    assert after[ABORTS] - before[ABORTS] > 100
    assert (
        after['nanovllm_requests_finished_total{finish_reason="length"}']
        == before['nanovllm_requests_finished_total{finish_reason="length"}']
    )
    generated = (
        after["nanovllm_generation_tokens_total"] - before["nanovllm_generation_tokens_total"]
    )
    assert generated < 150 * 400 / 4
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "after", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_request_abandoned_before_the_engine_took_it_is_never_added(app, base_url: str):
    engine = app.state.engine_thread.engine
    added: list[str] = []
    busy = threading.Event()
    real_add, real_step = engine.add_request, engine._step

    def add_request(prompt, params=None, request_id=None):
        added.append(str(request_id))
        return real_add(prompt, params, request_id)

    def slow_step() -> list | None:
        if busy.is_set():
            busy.clear()
            time.sleep(1.0)  # one long step: what a big prefill does to the engine thread
        return real_step()

    engine.add_request, engine._step = add_request, slow_step
    before = metrics(base_url)
    try:
        busy.set()
        with httpx.Client(base_url=base_url, timeout=30) as http:
            blocker = threading.Thread(
                target=http.post, args=("/v1/completions",), kwargs={"json": {"prompt": "x"}}
            )
            blocker.start()
            assert wait_for(lambda: len(added) == 1)
            storm(base_url, 20, 0.2)  # all gone while the long step runs
            blocker.join(30)
    finally:
        engine.add_request, engine._step = real_add, real_step
    assert len(added) == 1, added  # only the blocker: the abandoned 20 never reached it
    assert wait_for(lambda: metrics(base_url)[ABORTS] - before[ABORTS] == 20)
    assert metrics(base_url)["nanovllm_requests_waiting"] == 0
