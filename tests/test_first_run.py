"""What a new user hits first: a fast default model on the CPU, mistakes as one error line,
context limits, a model named by Hub id, and a terminal that says what is happening during
a long prefill and honours Ctrl-C promptly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from helpers import REPO_ROOT, SMALL_KV_ARGS, cli_argv, spawn_cli, without_blas_notice
from typer.testing import CliRunner

from cli.main import app
from nanovllm_mlx import LLM, SamplingParams

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A prompt that fills most of SmolLM2's prefill at 32 tokens a step: ~1,000 tokens, many
# steps, so Ctrl-C lands mid-prefill.
LONG_PROMPT = " ".join(f"item {i} is a word;" for i in range(200))


def run_cli(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_argv(*args),  # type: ignore[arg-type]
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
    )


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = without_blas_notice(proc.stderr.decode())
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# The default model on a CPU ----------------------------------------------------------------


def test_quantized_weights_are_dequantized_on_cpu_with_the_same_tokens(smollm2_gguf: Path):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = "The capital city of France is"
    fast = LLM(str(smollm2_gguf), max_model_len=256, kv_cache_gb=0.05)
    kept = LLM(str(smollm2_gguf), max_model_len=256, kv_cache_gb=0.05, keep_quantized=True)
    assert fast.engine.quantization == "dequantized to float32 at load"
    assert kept.engine.quantization == "kept quantized"
    assert (
        fast.generate(prompt, greedy)[0]["token_ids"]
        == kept.generate(prompt, greedy)[0]["token_ids"]
    )


# Mistakes are one line ----------------------------------------------------------------------


def test_non_utf8_stdin_and_arguments_are_one_error_line(gpt2_tiny: Path):
    model = ["ask", "-m", str(gpt2_tiny), "--max-tokens", "3", *SMALL_KV_ARGS]
    one_error_line(run_cli(*model, "-", stdin=b"caf\xe9\n"), "stdin is not valid UTF-8", "iconv")
    # Arguments the locale cannot decode reach Python as lone surrogates.
    one_error_line(run_cli(*model, os.fsencode("caf") + b"\xe9"), "not valid UTF-8")
    # A byte-order mark says how to read it: UTF-16 from a Windows pipe is fine.
    utf16 = run_cli(*model, "-", stdin="hello\n".encode("utf-16"))
    assert utf16.returncode == 0 and utf16.stdout.strip(), utf16.stderr


def test_a_kv_cache_larger_than_memory_is_refused_before_it_is_allocated(gpt2_tiny: Path):
    started = time.monotonic()
    proc = run_cli("ask", "-m", str(gpt2_tiny), "--kv-cache-gb", "100000", "hi")
    one_error_line(proc, "the KV cache needs", "GiB", "lower --kv-cache-gb")
    assert time.monotonic() - started < 60  # no 100 TB of zero-filling first


def test_max_tokens_past_the_context_is_capped_and_said_first_without_verbose(gpt2_tiny: Path):
    prompt = " ".join(["word"] * 480)  # GPT-2 tiny's context is 512 tokens
    proc = run_cli("ask", "-m", str(gpt2_tiny), *SMALL_KV_ARGS, "--max-tokens", "100", prompt)
    assert proc.returncode == 0, proc.stderr
    first = without_blas_notice(proc.stderr.decode()).splitlines()[0]
    note = re.fullmatch(
        r"note: --max-tokens 100 capped to (\d+): the context is 512 tokens \(--max-model-len\)"
        r" and the prompt has \d+",
        first,
    )
    assert note, proc.stderr
    # The same with --max-model-len, as the issue ran it: an answer cut, and said so.
    short = run_cli("ask", "-m", str(gpt2_tiny), *SMALL_KV_ARGS, "--max-model-len", "64",
                    "--max-tokens", "100", "--verbose", "one two three")  # fmt: skip
    err = without_blas_notice(short.stderr.decode())
    assert short.returncode == 0 and err.startswith("note: --max-tokens 100 capped to "), err
    generated = re.search(r"Generation: (\d+) tokens", err)
    capped = re.search(r"capped to (\d+)", err)
    assert generated and capped and int(generated.group(1)) <= int(capped.group(1))


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--max-tokens", "-5"], "--max-tokens must be in [1, "),
        (["--kv-cache-gb", "0"], "--kv-cache-gb must be > 0"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be a positive integer"),
    ],
)
def test_errors_name_the_flag_that_was_typed(gpt2_tiny: Path, args: list[str], flag: str):
    err = one_error_line(run_cli("ask", "-m", str(gpt2_tiny), *args, "hi"), flag)
    assert "_" not in err.split(" must ")[0], err  # no max_tokens, kv_cache_gb


def test_a_missing_relative_model_path_is_not_found_not_downloaded(monkeypatch, tmp_path):
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a path was taken for a Hub repo id")

    monkeypatch.setattr("nanovllm_mlx.loading.download.download", no_download)
    monkeypatch.chdir(REPO_ROOT)  # models/ exists here: models/nope is a path
    for missing in ("models/nope", "nope/model.gguf", str(REPO_ROOT / "models" / "nope")):
        result = CliRunner().invoke(app, ["ask", "-m", missing, "hi"])
        assert result.exit_code == 1, result.output
        assert f"'{missing}' not found locally" in result.stderr, result.stderr


def test_flags_show_no_value_in_help():
    for command in ("ask", "bench", "serve", "chat"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for line in result.stdout.splitlines():
            if any(f in line for f in ("--verbose", "--json", "--help", "--no-chat", "--no-live")):
                assert "<bool>" not in line, line


def test_a_hub_repo_id_is_downloaded_when_not_local(monkeypatch, gpt2_tiny: Path, tmp_path):
    calls = []

    def fake_download(name: str, output=None) -> Path:
        calls.append(name)
        return gpt2_tiny

    monkeypatch.setattr("nanovllm_mlx.loading.download.download", fake_download)
    monkeypatch.setenv("NANOVLLM_MODELS", str(tmp_path))  # nothing local by that name
    result = CliRunner().invoke(
        app, ["ask", "-m", "someorg/some-model", "--max-tokens", "4", *SMALL_KV_ARGS, "Hi"]
    )
    assert result.exit_code == 0, result.output
    assert calls == ["someorg/some-model"] and result.stdout.strip()


# The terminal during a long prefill -----------------------------------------------------------


def spawn(*args: str) -> pexpect.spawn:
    return spawn_cli(*args, width=200, timeout=120)


def slow_prefill(smollm2_gguf: Path, step_tokens: int = 32) -> list[str]:
    # 32 tokens a step on the 30-layer default model: a ~1,000-token prompt takes many
    # steps, each well under a second.
    return ["-m", str(smollm2_gguf), "--max-num-batched-tokens", str(step_tokens),
            "--max-model-len", "2048"]  # fmt: skip


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_ask_shows_prefill_progress_and_ctrl_c_ends_it_promptly(smollm2_gguf: Path):
    child = spawn("ask", *slow_prefill(smollm2_gguf), "--no-chat", LONG_PROMPT)
    child.expect(r"prefilling the prompt: [\d,]+/[\d,]+ tokens")
    child.expect(r"prefilling the prompt: [\d,]+/[\d,]+ tokens")  # it moves on
    child.sendintr()
    sent = time.monotonic()
    child.expect(pexpect.EOF, timeout=30)
    waited = time.monotonic() - sent
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.before
    # Far less than the rest of the prefill: the interrupt is seen after the current step.
    assert waited < 10, waited


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_chat_a_second_ctrl_c_during_a_prefill_exits(smollm2_gguf: Path):
    child = spawn("chat", *slow_prefill(smollm2_gguf, step_tokens=256))
    child.expect_exact(">>> ")
    child.sendline(LONG_PROMPT[:3000])  # a terminal line holds at most 4,095 characters
    child.expect(r"prefilling the prompt: [\d,]+/[\d,]+ tokens")
    # Two presses 50 ms apart, as the signals a terminal sends: both land within one
    # engine step (~2 s at this step size), which used to count as one press. (Two at
    # once would be one: the kernel merges a signal still pending.)
    os.kill(child.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(child.pid, signal.SIGINT)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 130, ANSI.sub("", child.before or "")
