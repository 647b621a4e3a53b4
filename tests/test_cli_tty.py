"""`nanovllm chat` (and ask's live view) in a real pseudo-terminal, driven by pexpect."""

from __future__ import annotations

import re
import sys

import pexpect
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
