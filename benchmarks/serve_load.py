"""Load test of the OpenAI-compatible server: requests/s, latency, TTFT and inter-token
latency (ITL) percentiles at 1, 8, 64 and 128 concurrent streaming clients, plus two
scenarios that show whether one client can hurt the others:

- long: ITL of --long-streams running streams while a --long-prompt-tokens prompt arrives,
  and that prompt's TTFT against the same length on an idle server;
- storm: --storm-requests chat requests abandoned after --storm-after seconds, then a
  follow-up request's latency against the same request on an idle server.

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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from serve_client import Connection, Workload, one_request, run_level, scrape

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


def summarize(clients: int, results: list[dict], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.array([np.nan])
    itl = np.array([g for r in ok for g in r["itl"]] or [np.nan])
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
        "itl_p50_s": float(np.percentile(itl, 50)),
        "itl_p99_s": float(np.percentile(itl, 99)),
    }


def table_header() -> str:
    head = (
        f"{'clients':>7} {'reqs':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9} {'batch':>6} "
        f"{'lat p50':>8} {'lat p99':>8} {'ttft p50':>8} {'ttft p99':>8} "
        f"{'itl p50':>8} {'itl p99':>8}"
    )
    return f"{head}\n{'-' * len(head)}"


def table_row(r: dict) -> str:
    return (
        f"{r['clients']:>7} {r['requests']:>5} {r['errors']:>4} {r['requests_per_s']:>7.2f} "
        f"{r['output_tok_per_s']:>9.1f} {r['mean_batch']:>6.1f} "
        f"{r['latency_p50_s']:>7.3f}s {r['latency_p99_s']:>7.3f}s "
        f"{r['ttft_p50_s']:>7.3f}s {r['ttft_p99_s']:>7.3f}s "
        f"{r['itl_p50_s']:>7.3f}s {r['itl_p99_s']:>7.3f}s"
    )


def percentiles(prefix: str, values: list[float]) -> dict[str, float]:
    data = np.array(values or [np.nan])
    return {f"{prefix}_p50_s": float(np.percentile(data, 50)),
            f"{prefix}_p99_s": float(np.percentile(data, 99))}  # fmt: skip


async def long_prompt(
    url: str, headers: dict[str, str], work: Workload, args: argparse.Namespace, context: int
) -> dict:
    """ITL of running streams while a long prompt is prefilled, and its TTFT vs alone."""
    length = min(args.long_prompt_tokens, context - 8)
    stream_tokens = max(1, min(512, context - args.prompt_tokens - 1))
    conn = Connection(url, headers)
    alone = await one_request(conn, work.body(length, 4))
    started = 0

    def first() -> None:
        nonlocal started
        started += 1

    streams = [
        asyncio.create_task(
            one_request(Connection(url, headers), work.body(args.prompt_tokens, stream_tokens),
                        first)
        )
        for _ in range(args.long_streams)
    ]  # fmt: skip
    while started < args.long_streams and not any(t.done() for t in streams):
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    loaded = await one_request(conn, work.body(length, 4))
    t1 = t0 + loaded.get("ttft", 0.0)
    results = await asyncio.gather(*streams)
    conn.close()
    # Gaps that overlap the long prompt's wait: the ones its prefill could have stretched.
    gaps = [b - a for r in results if r["ok"] for a, b in zip(r["stamps"], r["stamps"][1:])
            if a < t1 and b > t0]  # fmt: skip
    ok = alone["ok"] and loaded["ok"] and all(r["ok"] for r in results)
    return {
        "scenario": "long",
        "ok": ok,
        "long_prompt_tokens": length,
        "streams": args.long_streams,
        "ttft_alone_s": alone.get("ttft", float("nan")),
        "ttft_loaded_s": loaded.get("ttft", float("nan")),
        "ttft_ratio": loaded.get("ttft", float("nan")) / alone.get("ttft", float("nan")),
        **percentiles("itl_during", gaps),
        **percentiles("itl_all", [g for r in results if r["ok"] for g in r["itl"]]),
    }


async def abandon_storm(
    url: str, headers: dict[str, str], work: Workload, args: argparse.Namespace
) -> dict:
    """Follow-up latency after --storm-requests abandoned chat requests, vs idle."""
    follow = work.body(args.prompt_tokens, 10)

    async def latency() -> float:
        conn = Connection(url, headers)
        try:
            r = await one_request(conn, dict(follow))
        finally:
            conn.close()
        return r["latency"] if r["ok"] else float("nan")

    idle = float(np.median([await latency() for _ in range(3)]))
    parts = urlsplit(url)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def abandoned(i: int) -> None:
        body = json.dumps(
            {
                "model": work.model,
                "max_tokens": 256,
                "stream": True,
                "messages": [{"role": "user", "content": f"Tell story {i}."}],
            }
        )
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.hostname}:"
                     f"{parts.port}\r\n{head}Content-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
        await asyncio.sleep(args.storm_after)
        writer.close()

    before = scrape(url, headers)
    await asyncio.gather(*(abandoned(i) for i in range(args.storm_requests)))
    after_storm = await latency()
    await asyncio.sleep(1.0)
    left = scrape(url, headers)
    return {
        "scenario": "storm",
        "ok": not np.isnan(after_storm),
        "abandoned": args.storm_requests,
        "idle_latency_s": idle,
        "followup_latency_s": after_storm,
        "ratio": after_storm / idle,
        "abandoned_tokens": left["nanovllm_generation_tokens_total"]
        - before["nanovllm_generation_tokens_total"]
        - 10,
        "left_running": left["nanovllm_requests_running"],
        "left_waiting": left["nanovllm_requests_waiting"],
        "left_kv_blocks": left["nanovllm_kv_blocks_used"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", help="model to serve (default: the engine's default model)")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--api-key", help="bearer token for a server started with one")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length")
    parser.add_argument("--levels", default="1,8,64,128", help="concurrent clients per level")
    parser.add_argument("--scenarios", default="levels,long,storm", help="which to run")
    parser.add_argument("--long-prompt-tokens", type=int, default=2000, help="long scenario")
    parser.add_argument("--long-streams", type=int, default=8, help="long scenario's streams")
    parser.add_argument("--storm-requests", type=int, default=200, help="storm scenario")
    parser.add_argument("--storm-after", type=float, default=0.5, help="seconds to abandon")
    parser.add_argument("--timeout", type=float, default=600, help="per-request timeout (s)")
    parser.add_argument("--kv-cache-gb", type=float, help="engine option, when starting one")
    parser.add_argument("--max-num-seqs", type=int, help="engine option, when starting one")
    parser.add_argument("--max-num-batched-tokens", type=int, help="engine option, likewise")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    proc = None
    log = Path(tempfile.mkstemp(prefix="serve_load_", suffix=".log")[1])
    options = ("kv_cache_gb", "max_num_seqs", "max_num_batched_tokens")
    engine_kwargs = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    scenarios = set(args.scenarios.split(","))
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(args.model, engine_kwargs, log)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        card = models.raise_for_status().json()["data"][0]
        work = Workload(card["id"])

        def body() -> dict:
            return work.body(args.prompt_tokens, args.max_tokens)

        # Warm-up: first-call costs (graph building, allocations) are not load.
        asyncio.run(run_level(url, headers, 2, [body() for _ in range(2)], args.timeout))
        rows, extra = [], []
        for clients in levels if "levels" in scenarios else []:
            bodies = [body() for _ in range(max(args.requests, clients))]
            before = scrape(url, headers)
            results, wall = asyncio.run(run_level(url, headers, clients, bodies, args.timeout))
            rows.append(summarize(clients, results, wall, before, scrape(url, headers)))
            if not args.json:
                if len(rows) == 1:
                    print(table_header())
                print(table_row(rows[-1]), flush=True)
        if "long" in scenarios:
            extra.append(asyncio.run(long_prompt(url, headers, work, args, card["max_model_len"])))
        if "storm" in scenarios:
            extra.append(asyncio.run(abandon_storm(url, headers, work, args)))
        if args.json:
            config = {
                "model": card["id"],
                "url": url if args.url else None,
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "prompt_tokens": args.prompt_tokens,
                "engine_kwargs": engine_kwargs,
            }
            print(json.dumps({"config": config, "levels": rows, "scenarios": extra}, indent=2))
        else:
            for result in extra:
                print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in result.items()))  # fmt: skip
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
