"""`nanovllm chat` (and ask's live view) in a real pseudo-terminal, driven by pexpect."""

from __future__ import annotations

import io
import re
import sys

import pexpect
import pyte
import pytest
from helpers import SMALL_KV_ARGS, spawn_cli

PROMPT = ">>> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")


def spawn(*args: str) -> pexpect.spawn:
    return spawn_cli(*args)


def plain(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


def close(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


# A first message longer than one 16-token block: its blocks are reused on the next turn
# whatever the random model answers.
LONG_QUESTION = (
    "I am planning a long trip through Europe next summer, starting in Lisbon and ending in "
    "Helsinki; which cities should I visit on the way?"
)


def test_chat_answers_reuses_the_prefix_and_exits(gpt2_tiny):
    child = spawn("chat", "-m", str(gpt2_tiny), "--max-tokens", "12", *SMALL_KV_ARGS)
    child.expect_exact(PROMPT)
    assert "nanovllm chat" in plain(child.before)

    child.sendline(LONG_QUESTION)
    child.expect_exact(PROMPT)
    answer = plain(child.before).split(LONG_QUESTION, 1)[1].strip()
    assert answer  # a question answered, streamed onto the terminal

    child.sendline("And what should I eat there?")
    child.expect_exact(PROMPT)

    child.sendline("/stats")
    child.expect_exact(PROMPT)
    stats = plain(child.before)
    assert "turns" in stats and re.search(r"turns\s+2\b", stats), stats
    hit_tokens = int(re.search(r"prefix_hit_tokens\s+(\d+)", stats).group(1))
    assert hit_tokens >= 16, stats  # the second turn reused the first turn's blocks
    assert re.search(r"prefix_hit_rate\s+[\d.]+%", stats), stats
    assert re.search(r"KV blocks\s+\d+ used / \d+ total", stats), stats

    child.sendline("/reset")
    child.expect_exact("conversation cleared")
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect_exact(PROMPT)
    after_reset = plain(child.before)
    assert re.search(r"turns\s+0\b", after_reset)
    assert re.search(r"last prompt\s+0 tokens", after_reset), after_reset  # forgotten too

    child.sendline("/exit")
    assert close(child) == 0


def test_chat_ctrl_c_stops_the_answer_not_the_chat(gpt2_tiny):
    # No token limit: the answer runs to the 512-token context, so Ctrl-C lands mid-answer.
    child = spawn("chat", "-m", str(gpt2_tiny), "--max-tokens", "100000", *SMALL_KV_ARGS)
    child.expect_exact(PROMPT)
    child.sendline("Tell me a story.")
    child.expect_exact("Tell me a story.")
    child.expect(r"\S")  # the answer has begun
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)

    # Ctrl-C at the prompt does not leave either.
    child.sendintr()
    child.expect_exact("/exit or Ctrl-D")
    child.expect_exact(PROMPT)

    # Still working: the stopped answer stayed in the history, so this turn reuses it.
    child.sendline("/stats")
    child.expect_exact(PROMPT)
    assert re.search(r"turns\s+1\b", plain(child.before)), plain(child.before)

    child.sendeof()  # Ctrl-D leaves
    assert close(child) == 0


def test_ask_live_view_on_a_terminal(gpt2_tiny):
    child = spawn(
        "ask", "-m", str(gpt2_tiny), "--max-tokens", "40", *SMALL_KV_ARGS,
        "first prompt", "second prompt",
    )  # fmt: skip
    child.expect(pexpect.EOF)
    out = plain(child.before)
    child.close()
    assert child.exitstatus == 0, out
    assert out.index("[1/2] first prompt") < out.index("[2/2] second prompt")


# Ctrl-C leaves the terminal tidy ------------------------------------------------------------
# pyte replays everything the command wrote, the terminal's own "^C" echo included, on an
# emulated screen: what the person sees after the shell prompt comes back.

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the default model goes on counting
SLOW = ["--no-chat", "--max-tokens", "400", "--max-model-len", "1024"]


def interrupted(child: pexpect.spawn, when: str) -> tuple[pyte.Screen, int]:
    seen = io.StringIO()
    child.logfile_read = seen
    rows, columns = child.getwinsize()
    child.expect(when)
    child.sendintr()
    status = close(child)
    screen = pyte.Screen(columns, rows)
    pyte.Stream(screen).feed(seen.getvalue())
    return screen, status


def test_ask_ctrl_c_mid_answer_gives_the_shell_a_fresh_line(smollm2_gguf):
    child = spawn("ask", "-m", str(smollm2_gguf), *SLOW, COUNTING)
    screen, status = interrupted(child, r"\d+, \d+, \d+,")
    assert status == 130
    assert screen.cursor.x == 0, screen.display  # the shell's prompt starts its own line


def test_ask_ctrl_c_keeps_the_unfinished_answers_of_the_live_view(smollm2_gguf):
    child = spawn("ask", "-m", str(smollm2_gguf), *SLOW, COUNTING, "A, B, C, D, E, F,")
    screen, status = interrupted(child, r"\[2/2\].*\d+ tokens")
    shown = "\n".join(line.rstrip() for line in screen.display)
    assert status == 130
    assert f"[1/2] {COUNTING} · interrupted" in shown, shown
    assert "[2/2] A, B, C, D, E, F, · interrupted" in shown, shown


def test_bench_shows_the_time_left_and_ctrl_c_clears_its_dashboard(smollm2_gguf):
    child = spawn(
        "bench", "-m", str(smollm2_gguf), "--num-seqs", "4", "--min-input", "8",
        "--max-input", "16", "--min-output", "300", "--max-output", "400",
    )  # fmt: skip
    screen, status = interrupted(child, r"about \d+ (s|min) left")
    assert status == 130
    assert not any("nanovllm bench" in line or "╭" in line for line in screen.display), "\n".join(
        screen.display
    )


def test_chat_shows_thinking_dimmed(qwen2_tiny, tmp_path):
    from chat_templates import R1_THINKING, with_template

    # The template opens a <think> block: a random model never closes it, so all it
    # writes is thinking, shown dimmed (and not kept as an answer).
    model = with_template(qwen2_tiny, tmp_path / "r1", R1_THINKING)
    child = spawn("chat", "-m", str(model), "--max-tokens", "8", *SMALL_KV_ARGS)
    child.expect_exact(PROMPT)
    child.sendline("Why is the sky blue?")
    child.expect_exact(PROMPT)
    shown = child.before.split("Why is the sky blue?", 1)[1]
    assert "\x1b[2m" in shown and plain(shown).strip(), repr(shown)
    child.sendline("/stats")
    child.expect_exact(PROMPT)
    assert re.search(r"turns\s+0\b", plain(child.before))  # thinking alone is no answer
    child.sendline("/exit")
    assert close(child) == 0
