"""`nanovllm serve` as a user runs it: its flags, its first-run failures (one error line,
the right exit code, before the model loads when it is the port), the live panel on a
terminal and the stats line when piped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pexpect
import pytest
from helpers import without_blas_notice
from rich.console import Console
from typer.testing import CliRunner

from cli.main import app as cli
from cli.serve import Rates, render_panel, stats_line
from nanovllm_mlx.serving.settings import LOOPBACK_HOSTS, ServerSettings
from nanovllm_mlx.serving.snapshot import EngineSnapshot

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}
LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "serve", *args]


def run_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        serve_cmd(*args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = without_blas_notice(proc.stderr)
    assert err.count("\n") == 1 and err.startswith("error: "), proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr


# Flags ------------------------------------------------------------------------------------


def test_flags_become_settings(monkeypatch):
    calls = []
    monkeypatch.setattr("cli.serve.run_serve", lambda *a, **kw: calls.append((a, kw)))
    args = ["serve", "-m", "some/model", "--port", "9001", "--api-key", "k",
            "--max-num-seqs", "8", "--dtype", "float16", "--max-waiting", "3",
            "--request-timeout", "2.5", "--max-body-mb", "1", "--no-live"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (model, host, port, settings, engine), kw = calls[0]
    assert (model, host, port) == ("some/model", "127.0.0.1", 9001)
    assert engine == {"max_num_seqs": 8, "dtype": "float16"}
    assert settings == ServerSettings(
        api_key="k", max_waiting=3, request_timeout=2.5, max_body_bytes=2**20,
        allowed_hosts=LOOPBACK_HOSTS,
    )  # fmt: skip
    assert kw == {"live": False, "log_interval": 10.0}
    for flags, hosts in (
        (["--host", "0.0.0.0"], None),
        (["--allowed-hosts", "a.example,b.example", "--allowed-hosts", "c"],
         ("a.example", "b.example", "c")),
        (["--allowed-hosts", "*"], None),
    ):  # fmt: skip
        calls.clear()
        assert CliRunner().invoke(cli, ["serve", *flags]).exit_code == 0
        assert calls[0][0][3].allowed_hosts == hosts


# First-run failures -------------------------------------------------------------------------


def test_bad_model_is_one_error_line_and_exit_1(gpt2_corrupt: Path):
    assert_one_error_line(run_serve("-m", "/no/such/model", "--port", "0"), 1, "not found")
    assert_one_error_line(run_serve("-m", str(gpt2_corrupt), "--port", "0"), 1, "corrupt")


def test_bad_port_is_refused_before_the_model_loads():
    # The model does not exist either: the port error coming first proves the order.
    start = time.monotonic()
    assert_one_error_line(run_serve("-m", "/no/such/model", "--port", "99999"), 2, "--port")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        proc = run_serve("-m", "/no/such/model", "--port", port)
    assert_one_error_line(proc, 1, "cannot listen", port, "already in use")
    assert time.monotonic() - start < 30


# Live panel and stats line -------------------------------------------------------------------

SNAPSHOT = EngineSnapshot(
    time=10.0, alive=True, running=3, waiting=2, kv_blocks_used=40, kv_blocks_total=160,
    kv_blocks_cached=7, prefix_hit_rate=0.25, prompt_tokens=900, generation_tokens=300,
    prompt_tok_s=0.0, generation_tok_s=0.0, batch_size=3, peak_batch_size=5, steps=120,
    step_sequences=300, preemptions=1, step_failures=0, requests_finished=12,
    requests_failed=1,
)  # fmt: skip


def test_live_panel_shows_the_snapshot():
    console = Console(record=True, width=110, force_terminal=False)
    rates = Rates(prompt_tok_s=123.4, generation_tok_s=56.7, requests_s=1.5)
    totals = {"stop": 10, "length": 2, "error": 1, "timeout": 0, "abort": 4, "rejected": 3}
    console.print(render_panel(SNAPSHOT, rates, totals, "nanovllm serve · m", 256, 75))
    text = console.export_text()
    for part in ("nanovllm serve · m", "running 3", "waiting 2 / 256", "batch 3 seqs (peak 5)",
                 "40/160 blocks (25%), 7 cached", "hit rate 25.0%", "prompt 123.4 tok/s",
                 "generation 56.7 tok/s", "1.50 req/s", "12 answered", "1 errors", "4 abandoned",
                 "3 refused", "up 0:01:15"):  # fmt: skip
        assert part in text, (part, text)


def test_stats_line_is_vllm_shaped():
    earlier = replace(SNAPSHOT, time=0.0, prompt_tokens=0, generation_tokens=100)
    line = stats_line(SNAPSHOT, Rates.between(earlier, SNAPSHOT))
    assert line == (
        "Avg prompt throughput: 90.0 tokens/s, Avg generation throughput: 20.0 tokens/s, "
        "Running: 3 reqs, Waiting: 2 reqs, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%"
    )


GENERATED = re.compile(r"Avg generation throughput: [1-9][\d.]* tokens/s")


def test_piped_serve_logs_stats_lines(gpt2_tiny: Path):
    proc = subprocess.Popen(
        serve_cmd("-m", str(gpt2_tiny), "--port", "0", "--kv-cache-gb", "0.05",
                  "--log-interval", "0.2"),
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if match := LISTENING.search(line):
                break
        assert match, lines
        body = {"prompt": "hi", "max_tokens": 60, "ignore_eos": True}
        r = httpx.post(f"http://127.0.0.1:{match.group(1)}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        # A line comes every 0.2 s: read them until one has seen the tokens, not a fixed wait.
        deadline = time.monotonic() + 30
        for line in proc.stderr:
            lines.append(line)
            if GENERATED.search(line) or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    stats = [line for line in lines + rest.splitlines() if "Avg prompt throughput" in line]
    assert stats and GENERATED.search("".join(stats))
    assert "Running: " in stats[0] and "KV cache usage: " in stats[0]
    assert proc.returncode in (0, 130) and "terminate called" not in rest, rest


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_terminal_serve_shows_the_live_panel(gpt2_tiny: Path):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "cli.main", "serve", "-m", str(gpt2_tiny), "--port", "0", "--kv-cache-gb", "0.05"],
        cwd=str(REPO_ROOT), encoding="utf-8", dimensions=(40, 120), timeout=60,
        env={**ENV, "TERM": "xterm-256color"},
    )  # fmt: skip
    child.expect(r"http://127\.0\.0\.1:(\d+)")
    port = int(child.match.group(1))
    child.expect("KV cache")
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi"}, timeout=60)
    assert r.status_code == 200
    child.expect(r"1 answered")  # the panel redraws from the published snapshot
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus in (0, 130) and "terminate called" not in child.before
    assert '"POST /v1/completions' not in child.before  # no access lines over the panel
