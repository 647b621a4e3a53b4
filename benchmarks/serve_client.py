"""The load generator's HTTP client for benchmarks/serve_load.py: a cheap streaming
connection, one request's timings (TTFT, latency, inter-token gaps), and request bodies.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np


def scrape(url: str, headers: dict[str, str]) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=60).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)
    }


def sse_events(data: bytes) -> list[dict]:
    events = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            events.append(json.loads(event[6:]))
    return events


class Connection:
    """A keep-alive HTTP/1.1 connection speaking just enough to stream one POST at a time.

    httpx spends ~250 us of client CPU per streamed chunk; at 64 clients the load generator
    then saturates before the server does. This costs a few tens of microseconds.
    """

    def __init__(self, url: str, headers: dict[str, str]):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: bytes) -> tuple[int, AsyncIterator[bytes]]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.head}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, self._body(headers)

    async def _body(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        reader = self.reader
        assert reader is not None
        if "content-length" in headers:
            yield await reader.readexactly(int(headers["content-length"]))
            return
        while size := int((await reader.readline()).strip() or b"0", 16):  # chunked
            yield (await reader.readexactly(size + 2))[:-2]
        await reader.readline()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def one_request(
    conn: Connection, body: dict, on_first: Callable[[], None] | None = None
) -> dict[str, Any]:
    """One streamed request. Only the events up to the first token, and the last ones
    (usage, or an error), are parsed, to keep the client cheap; every later chunk (one
    server-sent event each) is only timestamped, for the inter-token latency."""
    start = time.perf_counter()
    ttft = None
    stamps: list[float] = []  # arrival of each chunk from the first token on
    pending = b""  # not yet parsed: events before the first token, then the stream's tail
    status, chunks = await conn.post_stream("/v1/completions", json.dumps(body).encode())
    async for data in chunks:
        if status != 200:
            return {"ok": False}
        now = time.perf_counter()
        pending += data
        if ttft is None:
            complete, _, pending = pending.rpartition(b"\n\n")
            for event in sse_events(complete):
                if "error" in event:
                    ttft = -1.0
                elif event["choices"] and event["choices"][0]["text"]:
                    ttft = now - start
                    stamps.append(now)
                    if on_first is not None:
                        on_first()
        else:
            stamps.append(now)
            pending = pending[-8192:]
    end = time.perf_counter() - start
    # The tail may begin mid-event: parse from the first whole one.
    last = sse_events(pending[pending.find(b"data: ") :])
    if ttft == -1.0 or not last or "error" in last[-1] or not last[-1].get("usage"):
        return {"ok": False}
    tokens = last[-1]["usage"]["completion_tokens"]
    stamps = stamps[:-2]  # the usage chunk and [DONE] follow the last token at once
    return {
        "ok": True,
        "latency": end,
        "ttft": end if ttft is None else ttft,
        "tokens": tokens,
        "stamps": stamps,
        "itl": list(np.diff(stamps)),
    }


async def run_level(
    url: str, headers: dict[str, str], clients: int, bodies: list[dict], timeout: float
) -> tuple[list[dict], float]:
    queue = list(reversed(bodies))
    results: list[dict] = []

    async def worker() -> None:
        conn = Connection(url, headers)
        try:
            while queue:
                body = queue.pop()
                try:
                    results.append(await asyncio.wait_for(one_request(conn, body), timeout))
                except (OSError, ValueError, IndexError, asyncio.TimeoutError):
                    conn.close()  # its stream is in an unknown state
                    results.append({"ok": False})
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - start


class Workload:
    """Request bodies: random token-id prompts (never a prefix-cache hit), fixed lengths."""

    def __init__(self, model: str, seed: int = 0):
        self.model = model
        self.rng = random.Random(seed)

    def body(self, prompt_tokens: int, max_tokens: int) -> dict:
        return {
            "model": self.model,
            "prompt": [self.rng.randrange(10_000) for _ in range(prompt_tokens)],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
