"""The `nanovllm` command line, driven through Typer's CliRunner (ask, bench, download,
serve, errors) and as a real subprocess where the exact bytes on stderr matter."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import REPO_ROOT, SMALL_KV, SMALL_KV_ARGS, cli_argv, run_cli, without_blas_notice
from typer.testing import CliRunner

from cli.main import app
from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.bench import fit_workload, make_workload


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, input: str | None = None):
    result = runner.invoke(app, list(args), input=input)
    # CliRunner's stdout is not a terminal: nothing may style or animate it.
    assert "\x1b" not in result.stdout, result.stdout
    assert "\x1b" not in result.stderr, result.stderr
    return result


def greedy(model: Path, prompts: list[str], max_tokens: int) -> list[str]:
    llm = LLM(str(model), **SMALL_KV)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o["text"] for o in outs]


# ask -------------------------------------------------------------------------------------


def test_version(runner):
    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("nanovllm ")


def test_ask_one_prompt_prints_the_engines_answer(runner, gpt2_tiny):
    result = invoke(runner, "ask", "-m", str(gpt2_tiny), "--max-tokens", "12", *SMALL_KV_ARGS, "Hi")
    assert result.exit_code == 0, result.output
    (expected,) = greedy(gpt2_tiny, ["Hi"], 12)
    assert result.stdout == expected.lstrip() + "\n"


def test_ask_several_prompts_are_labelled_in_input_order(runner, gpt2_tiny):
    prompts = ["Hello there", "The capital of France is", "Once upon a time"]
    result = invoke(
        runner, "ask", "-m", str(gpt2_tiny), "--max-tokens", "10", *SMALL_KV_ARGS, *prompts
    )
    assert result.exit_code == 0, result.output
    expected = greedy(gpt2_tiny, prompts, 10)
    blocks = [
        f"[{i + 1}/3] {p}\n{e.lstrip()}\n\n" for i, (p, e) in enumerate(zip(prompts, expected))
    ]
    assert result.stdout == "".join(blocks)


def test_ask_reads_prompts_from_stdin(runner, gpt2_tiny):
    result = invoke(
        runner, "ask", "-m", str(gpt2_tiny), "--max-tokens", "4", *SMALL_KV_ARGS, "-", "last",
        input="first\n\n  second  \n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    labels = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert labels == ["[1/3] first", "[2/3] second", "[3/3] last"]


def test_ask_stop_string_cuts_the_answer(runner, gpt2_tiny):
    (full,) = greedy(gpt2_tiny, ["Hello there"], 16)
    words = full.split()
    stop = words[len(words) // 2]
    result = invoke(
        runner, "ask", "-m", str(gpt2_tiny), "--max-tokens", "16", "--stop", stop, *SMALL_KV_ARGS,
        "Hello there",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == full[: full.index(stop)].lstrip() + "\n"


def test_ask_chat_template_and_verbose(runner, gpt2_tiny):
    # GPT-2 has no template: --chat uses the engine's plain "User:/Assistant:" fallback.
    result = invoke(
        runner, "ask", "-m", str(gpt2_tiny), "--chat", "--system", "Be brief.", "--verbose",
        "--max-tokens", "8", "--temp", "0.7", "--top-p", "0.9", "--top-k", "40",
        "--min-p", "0.05", "--seed", "1", *SMALL_KV_ARGS, "Hi",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "Prompt: " in err and " tokens-per-sec" in err
    assert "Generation: " in err
    assert "Time to first token: " in err
    assert "Peak memory: " in err and " GB" in err
    assert "Backend: MLX " in err and "BLAS" in err
    # Where start-up went: the load, the pool, the step budget (a CPU warms nothing up).
    startup = next(line for line in err.splitlines() if line.startswith("Start-up: "))
    assert all(f"{phase} " in startup for phase in ("load", "pool", "budget"))


def test_ask_seed_makes_sampling_reproducible(runner, gpt2_tiny):
    args = ["ask", "-m", str(gpt2_tiny), "--max-tokens", "8", "--temp", "1.0", *SMALL_KV_ARGS]
    a = invoke(runner, *args, "--seed", "7", "Hi")
    b = invoke(runner, *args, "--seed", "7", "Hi")
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout


# chat ------------------------------------------------------------------------------------


def test_chat_reads_a_pipe(gpt2_tiny):
    """A script piping turns into chat: no terminal to configure (tcgetattr raised out of
    chat once), answers and the /stats table on stdout, exit 0 at /exit."""
    script = "Hello there\nAnd then?\n/stats\n/exit\n"
    proc = subprocess.run(
        cli_argv("chat", "-m", str(gpt2_tiny), "--max-tokens", "8", *SMALL_KV_ARGS),
        cwd=REPO_ROOT, input=script, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "turns: 2" in proc.stdout and "prefix_hit_tokens:" in proc.stdout, proc.stdout


# bench -----------------------------------------------------------------------------------

BENCH = ["--num-seqs", "4", "--min-input", "8", "--max-input", "32"]
BENCH += ["--min-output", "4", "--max-output", "16", "--seed", "3", *SMALL_KV_ARGS]


def test_bench_json_is_the_last_line(runner, gpt2_tiny):
    result = invoke(runner, "bench", "-m", str(gpt2_tiny), *BENCH, "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: stdout is the JSON alone, the table goes to stderr
    data = json.loads(lines[-1])
    for key in (
        "output_tokens", "seconds", "throughput", "prefill_throughput", "decode_throughput",
        "peak_memory_gb", "num_seqs", "prompt_tokens", "preemptions",
    ):  # fmt: skip
        assert key in data, key
    workload = make_workload(4, 8, 32, 4, 16, 3, 50257)
    # ignore_eos: every request runs to its max_tokens exactly.
    assert data["output_tokens"] == sum(n for _, n in workload)
    assert data["prompt_tokens"] == sum(len(ids) for ids, _ in workload)
    assert data["num_seqs"] == 4
    assert data["throughput"] > 0 and data["peak_memory_gb"] > 0
    assert "throughput" in result.stderr  # the summary table


def test_bench_prints_a_summary_table(runner, gpt2_tiny):
    result = invoke(runner, "bench", "-m", str(gpt2_tiny), *BENCH)
    assert result.exit_code == 0, result.output
    for row in ("throughput", "prefill", "decode", "peak memory", "output tokens"):
        assert row in result.stdout


def test_make_workload_follows_the_recipe():
    a = make_workload(20, 5, 9, 3, 4, seed=1, vocab_size=50)
    assert a == make_workload(20, 5, 9, 3, 4, seed=1, vocab_size=50)
    assert a != make_workload(20, 5, 9, 3, 4, seed=2, vocab_size=50)
    assert all(5 <= len(ids) <= 9 and 3 <= n <= 4 for ids, n in a)
    assert all(0 <= t < 50 for ids, _ in a for t in ids)  # clipped to the vocabulary
    big = make_workload(4, 100, 100, 1, 1, seed=0, vocab_size=50257)
    assert max(t for ids, _ in big for t in ids) < 10_000
    with pytest.raises(ValueError):
        make_workload(1, 10, 5, 1, 1)


def test_fit_workload_keeps_output_lengths():
    fitted, shortened = fit_workload([([1] * 10, 5), ([1] * 3, 4), ([1] * 2, 50)], 12)
    assert [(len(ids), n) for ids, n in fitted] == [(7, 5), (3, 4), (1, 11)]
    assert shortened == 2


# errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, code",
    [
        (["ask", "--bogus", "hi"], 2),
        (["ask"], 2),
        (["ask", "--max-tokens", "many", "hi"], 2),
        (["ask", "--dtype", "float8", "hi"], 2),
        (["nonsense"], 2),
        (["ask", "-m", "/no/such/model", "hi"], 1),
        (["chat", "-m", "/no/such/model"], 1),
        (["bench", "-m", "/no/such/model"], 1),
        (["bench", "--min-input", "50", "--max-input", "10"], 1),
        (["bench", "--num-seqs", "0"], 1),
    ],
)
def test_errors_are_one_line(runner, args, code):
    result = invoke(runner, *args)
    assert result.exit_code == code, result.output
    lines = without_blas_notice(result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--temp", "-1"],
        ["--top-p", "0"],
        ["--max-tokens", "0"],
        ["--max-num-seqs", "0"],
        ["--quantize", "3"],
        ["--max-model-len", "4000000", "--kv-cache-gb", "0.0001"],
    ],
)
def test_engine_value_errors_are_one_line(runner, gpt2_tiny, args):
    result = invoke(runner, "ask", "-m", str(gpt2_tiny), *args, "hi")
    assert result.exit_code == 1, result.output
    lines = without_blas_notice(result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_too_long_prompt_is_one_line(runner, gpt2_tiny):
    result = invoke(runner, "ask", "-m", str(gpt2_tiny), *SMALL_KV_ARGS, "ok", "word " * 600)
    assert result.exit_code == 1
    lines = without_blas_notice(result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prompt 2: "), result.stderr


def test_download_calls_the_engines_downloader(runner, monkeypatch, tmp_path):
    calls = []

    def fake_download(name, output):
        calls.append((name, output))
        return tmp_path / "model"

    monkeypatch.setattr("nanovllm_mlx.loading.download.download", fake_download)
    result = invoke(runner, "download", "HuggingFaceTB/SmolLM2-135M", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert calls == [("HuggingFaceTB/SmolLM2-135M", str(tmp_path))]
    assert result.stdout.strip() == str(tmp_path / "model")


# The real process: exact stderr bytes, and plain output even when asked for colour --------


def test_real_process_errors_are_one_line_without_traceback():
    for args in (["ask", "--bogus", "x"], ["ask", "-m", "/no/such/model", "hi"]):
        proc = run_cli(*args)
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_real_process_piped_output_is_plain(gpt2_tiny):
    # FORCE_COLOR would make Rich style a pipe; stdout that is not a terminal stays plain.
    proc = run_cli(
        "ask", "-m", str(gpt2_tiny), "--max-tokens", "6", "--verbose", *SMALL_KV_ARGS, "a", "b",
        env={"FORCE_COLOR": "1", "TERM": "xterm-256color"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[1/2] a" in proc.stdout and "[2/2] b" in proc.stdout
    assert "\x1b" not in proc.stdout and "\x1b" not in proc.stderr


def test_bench_time_left_scales_the_time_so_far_by_the_tokens_left():
    from cli.dashboard import seconds_left, time_left

    reading = {  # 1,000 prompt tokens and 200 output tokens computed in 6 s
        "elapsed": 6.0, "prefill_tokens": 1000, "total_prompt_tokens": 3000,
        "output_tokens": 200, "total_output_tokens": 1000,
    }  # fmt: skip
    assert seconds_left(reading) == 6.0 * 2800 / 1200
    assert time_left(reading) == "about 14 s left"
    assert time_left({**reading, "elapsed": 600.0}) == "about 23 min left"
    assert time_left({**reading, "prefill_tokens": 0, "output_tokens": 0}) == (
        "estimating the time left"
    )


def test_chat_answer_view_sets_thinking_apart():
    from cli.answer_view import DIM, UNDIM, AnswerView

    view = AnswerView("... </think> ...", "<|im_start|>assistant\n", color=True)
    text = "<think>\nHmm, blue light scatters.\n</think>\n\nRayleigh scattering."
    shown = "".join(view.feed(c) for c in text) + view.feed("", final=True)
    assert shown.startswith(DIM) and shown.endswith("\n\nRayleigh scattering.")
    unstyled = shown.replace(DIM, "").replace(UNDIM, "")
    assert unstyled == "Hmm, blue light scatters.\n\n\nRayleigh scattering."
    assert view.answer == "Rayleigh scattering."
    plain = AnswerView(None, "", color=True)
    assert plain.feed(" <think>kept as is") == "<think>kept as is" and plain.answer


def test_a_ctrl_c_swallowed_inside_a_step_is_raised_at_the_next_check():
    """MLX's mx.array(<numpy array>) drops a KeyboardInterrupt raised while it converts;
    the commands' guard keeps the press and raises it between steps."""
    import os
    import signal

    from cli.ui import interrupts_kept

    def a_step_that_swallows() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at one of these bytecodes
                pass
        except KeyboardInterrupt:
            pass  # what mx.array does with it

    previous = signal.getsignal(signal.SIGINT)
    with interrupts_kept() as check:
        check()  # nothing pressed yet: no-op
        a_step_that_swallows()
        with pytest.raises(KeyboardInterrupt):
            check()
    assert signal.getsignal(signal.SIGINT) is previous  # the command's handler is put back
