"""Load test of the OpenAI-compatible server: requests/s, latency and TTFT percentiles at
1, 8 and 64 concurrent streaming clients.

    python benchmarks/serve_load.py --model tests/.fixtures/gpt2-tiny
    python benchmarks/serve_load.py --url http://127.0.0.1:8000   # a server already running

Without --url the server is started in a subprocess on a free 127.0.0.1 port (so the load
generator does not share a GIL with it) and stopped at the end. Each request streams
/v1/completions with a fixed-length token-id prompt and ignore_eos, so every request
produces exactly --max-tokens tokens and the levels are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, engine_kwargs: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    pythonpath = os.environ.get("PYTHONPATH", "")
    code = (
        "import json, sys; from nanovllm_mlx.serving.app import run_server; "
        "run_server(json.loads(sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]), "
        "**json.loads(sys.argv[3]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(model), str(port), json.dumps(engine_kwargs)],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), pythonpath]))},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a model download or a big load can take a while
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not come up in 600 s")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
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


async def one_request(conn: Connection, body: dict) -> dict[str, float | int | bool]:
    """One streamed request. Only the events up to the first token, and the last ones
    (usage, or an error), are parsed, to keep the client cheap."""
    start = time.perf_counter()
    ttft = None
    pending = b""  # not yet parsed: events before the first token, then the stream's tail
    status, chunks = await conn.post_stream("/v1/completions", json.dumps(body).encode())
    async for data in chunks:
        if status != 200:
            return {"ok": False}
        pending += data
        if ttft is None:
            complete, _, pending = pending.rpartition(b"\n\n")
            for event in sse_events(complete):
                if "error" in event:
                    ttft = -1.0
                elif event["choices"] and event["choices"][0]["text"]:
                    ttft = time.perf_counter() - start
        else:
            pending = pending[-8192:]
    end = time.perf_counter() - start
    # The tail may begin mid-event: parse from the first whole one.
    last = sse_events(pending[pending.find(b"data: ") :])
    if ttft == -1.0 or not last or "error" in last[-1] or not last[-1].get("usage"):
        return {"ok": False}
    tokens = last[-1]["usage"]["completion_tokens"]
    return {"ok": True, "latency": end, "ttft": end if ttft is None else ttft, "tokens": tokens}


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


def summarize(clients: int, results: list[dict], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.array([np.nan])
    steps = after["nanovllm_engine_steps_total"] - before["nanovllm_engine_steps_total"]
    seqs = (
        after["nanovllm_engine_step_sequences_total"]
        - before["nanovllm_engine_step_sequences_total"]
    )
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tok_per_s": sum(r["tokens"] for r in ok) / wall,
        "mean_batch": seqs / steps if steps else 0.0,
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
    }


def table_header() -> str:
    head = (
        f"{'clients':>7} {'reqs':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9} {'batch':>6} "
        f"{'lat p50':>8} {'lat p99':>8} {'ttft p50':>8} {'ttft p99':>8}"
    )
    return f"{head}\n{'-' * len(head)}"


def table_row(r: dict) -> str:
    return (
        f"{r['clients']:>7} {r['requests']:>5} {r['errors']:>4} {r['requests_per_s']:>7.2f} "
        f"{r['output_tok_per_s']:>9.1f} {r['mean_batch']:>6.1f} "
        f"{r['latency_p50_s']:>7.3f}s {r['latency_p99_s']:>7.3f}s "
        f"{r['ttft_p50_s']:>7.3f}s {r['ttft_p99_s']:>7.3f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", help="model to serve (default: the engine's default model)")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--api-key", help="bearer token for a server started with one")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length")
    parser.add_argument("--levels", default="1,8,64", help="concurrent clients per level")
    parser.add_argument("--timeout", type=float, default=600, help="per-request timeout (s)")
    parser.add_argument("--kv-cache-gb", type=float, help="engine option, when starting one")
    parser.add_argument("--max-num-seqs", type=int, help="engine option, when starting one")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    proc = None
    log = Path(tempfile.mkstemp(prefix="serve_load_", suffix=".log")[1])
    engine_kwargs = {
        k: v
        for k, v in (("kv_cache_gb", args.kv_cache_gb), ("max_num_seqs", args.max_num_seqs))
        if v is not None
    }
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(args.model, engine_kwargs, log)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        model = models.raise_for_status().json()["data"][0]["id"]
        rng = random.Random(0)

        def body() -> dict:
            return {
                "model": model,
                "prompt": [rng.randrange(10_000) for _ in range(args.prompt_tokens)],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        # Warm-up: first-call costs (graph building, allocations) are not load.
        asyncio.run(run_level(url, headers, 2, [body() for _ in range(2)], args.timeout))
        rows = []
        for clients in levels:
            bodies = [body() for _ in range(max(args.requests, clients))]
            before = scrape(url)
            results, wall = asyncio.run(run_level(url, headers, clients, bodies, args.timeout))
            rows.append(summarize(clients, results, wall, before, scrape(url)))
            if not args.json:
                if len(rows) == 1:
                    print(table_header())
                print(table_row(rows[-1]), flush=True)
        if args.json:
            config = {
                "model": model,
                "url": url if args.url else None,
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "prompt_tokens": args.prompt_tokens,
                "engine_kwargs": engine_kwargs,
            }
            print(json.dumps({"config": config, "levels": rows}, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
