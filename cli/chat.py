"""`nanovllm chat`: a REPL over the chat template, one streamed answer per turn.

Every turn re-renders the whole conversation; its tokens start with the previous turn's
prompt and answer, so the engine's prefix cache finds those blocks and only the new
message is computed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import replace
from types import FrameType

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.answer_view import AnswerView
from cli.ask import FALLBACK_STOP
from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.engine import requests

PROMPT = ">>> "
HELP = (
    "/reset  forget the conversation\n"
    "/stats  prefix-cache reuse and KV-cache use\n"
    "/exit   leave (or Ctrl-D); Ctrl-C stops an answer"
)


class StopFlag:
    """Turns SIGINT into a flag while an answer streams, so the engine is only ever
    interrupted between steps (a KeyboardInterrupt mid-step could leave it inconsistent).
    A second Ctrl-C in the same answer raises KeyboardInterrupt as an escape hatch.

    Presses are counted through a wakeup fd, one byte per signal: Python runs a handler
    once for however many signals arrived during a long C call (an engine step), so two
    quick presses used to count as one and the second never exited."""

    def __init__(self) -> None:
        self.hit = False
        self.presses = 0
        self._previous: object = None
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        arrived = 1
        if self._pipe is not None:
            try:
                arrived = max(len(os.read(self._pipe[0], 64)), 1)
            except BlockingIOError:
                pass
        self.presses += arrived
        self.hit = True
        if self.presses >= 2:
            raise KeyboardInterrupt

    def __enter__(self) -> StopFlag:
        self.hit, self.presses = False, 0
        try:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._previous_fd = signal.set_wakeup_fd(w)
            self._pipe = (r, w)
        except (OSError, ValueError):  # not the main thread: count handler calls only
            self._pipe = None
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None


class ChatSession:
    def __init__(
        self,
        llm: LLM,
        params: SamplingParams,
        system: str | None,
        verbose: bool,
        out: Console,
    ):
        self.llm = llm
        self.engine = llm.engine
        self.params = params
        if not llm.tokenizer.has_chat_template:
            # The fallback "User:/Assistant:" template: a base model would carry on writing
            # the user's next line; stop it there.
            params.stop = [*params.stop, FALLBACK_STOP]
        self.head = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, str]] = list(self.head)
        self.verbose = verbose
        self.out = out
        self.turns = 0
        self.last: dict[str, float] = {}

    # The loop ---------------------------------------------------------------------

    def run(self) -> None:
        self.out.print(
            f"[bold]nanovllm chat[/] · {escape(self.engine.model_name)} · "
            "[dim]/help for commands, /exit or Ctrl-D to leave[/]"
        )
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.out.print()
                return
            except KeyboardInterrupt:
                self.out.print("\n[dim](/exit or Ctrl-D to leave)[/]")
                continue
            except UnicodeDecodeError as e:
                self.out.print(
                    f"[bold red]error:[/] that line is not valid UTF-8 (byte "
                    f"0x{e.object[e.start : e.start + 1].hex()}); set a UTF-8 locale "
                    "(LANG=C.UTF-8) or type it again"
                )
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text):
                    return
                continue
            self.turn(text)

    def command(self, text: str) -> bool:
        """Run a slash command; True means leave."""
        name = text.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return True
        if name == "/reset":
            self.messages = list(self.head)
            self.turns = 0
            self.last = {}
            self.out.print("[dim](conversation cleared)[/]")
        elif name == "/stats":
            self.show_stats()
        elif name in ("/help", "/?"):
            self.out.print(HELP, markup=False)
        else:
            self.out.print(f"unknown command {escape(name)}; /help lists them")
        return False

    def turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        try:
            tokenizer = self.llm.tokenizer
            prompt_text = tokenizer.apply_chat_template(self.messages)
            prompt = tokenizer.encode_text(prompt_text)
            room = requests.room(len(prompt), self.engine.max_model_len)
            params = self.params
            if 0 < room < params.max_tokens:  # the engine would stop there anyway
                params = replace(params, max_tokens=room)
            request_id = self.engine.add_request(prompt, params)
        except ValueError as e:
            # Typically the conversation outgrew the context: keep the history as it was.
            self.messages.pop()
            self.out.print(f"[bold red]error:[/] {escape(str(e))} [dim](/reset starts over)[/]")
            return
        color = self.out.is_terminal and not self.out.no_color
        view = AnswerView(tokenizer.chat_template, prompt_text, color)
        answer, stopped = self.stream(request_id, len(prompt), view)
        if answer:
            # Kept even when stopped by Ctrl-C: the model remembers what the user saw, and
            # the blocks it already wrote stay reusable.
            self.messages.append({"role": "assistant", "content": answer})
            self.turns += 1
        else:
            self.messages.pop()  # nothing said: as if the question was never asked

    def stream(self, request_id: str, prompt_tokens: int, view: AnswerView) -> tuple[str, bool]:
        start = time.perf_counter()
        first = None
        cached = outputs_n = 0
        stopped = False
        write = sys.stdout.write
        status = (
            self.out.status("prefilling the prompt…", spinner="dots")
            if self.out.is_terminal
            else None
        )
        with (
            StopFlag() as flag,
            quiet_ctrl_c(),
            status or nullcontext(),
            closing(self.engine.iterate([request_id])) as steps,
        ):
            for outputs in steps:
                for out in outputs:
                    if out.token_ids:
                        first = first or time.perf_counter()
                    cached, outputs_n = out.num_cached_tokens, out.num_output_tokens
                    delta = view.feed(out.text)
                    if delta and status is not None:
                        status.stop()  # the answer takes the terminal from here
                        status = None
                    write(delta)
                    sys.stdout.flush()
                if flag.hit:
                    stopped = True  # leaving the loop closes the iterator: an abort
                    break
                if status is not None and (progress := self.engine.progress(request_id)):
                    status.update(f"prefilling the prompt: {progress[0]:,}/{progress[1]:,} tokens…")
        write(view.feed("", final=True) + "\n")
        if stopped:
            self.out.print("[stopped]", style="dim", markup=False)
        end = time.perf_counter()
        # The first token comes out of the prefill: the rate counts the ones after it.
        decode_s = end - first if first else 0.0
        tok_s = (outputs_n - 1) / decode_s if outputs_n > 1 and decode_s > 0 else None
        self.last = {
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached,
            "output_tokens": outputs_n,
            "ttft_s": (first - start) if first else 0.0,
            "tok_s": tok_s,
        }
        if self.verbose:
            self.out.print(
                f"[dim]prompt {prompt_tokens} tokens ({cached} from cache) · "
                f"{_tokens(outputs_n)}{f' · {tok_s:.1f} tok/s' if tok_s else ''} · "
                f"first token {self.last['ttft_s']:.3f} s[/]"
            )
        return view.answer.strip(), stopped

    def show_stats(self) -> None:
        s = self.llm.stats()
        last = self.last
        rows = [
            ("turns", str(self.turns)),
            (
                "last prompt",
                f"{last.get('prompt_tokens', 0)} tokens, "
                f"{last.get('cached_tokens', 0)} reused from the prefix cache",
            ),
            (
                "last answer",
                _tokens(last.get("output_tokens", 0))
                + (f", {last['tok_s']:.1f} tok/s" if last.get("tok_s") else ""),
            ),
            ("prefix_hit_rate", f"{s['prefix_hit_rate']:.1%}"),
            ("prefix_hit_tokens", str(s["prefix_hit_tokens"])),
            (
                "KV blocks",
                f"{s['kv_blocks_used']} used / {s['kv_blocks_total']} total, "
                f"{s['kv_blocks_cached']} cached for reuse ({s['block_size']} tokens each)",
            ),
            ("peak memory", f"{s['peak_memory_gb']:.3f} GB"),
        ]
        if self.out.is_terminal:
            table = Table(show_header=False, box=None, padding=(0, 2))
            table.add_column(style="bold")
            table.add_column()
            for key, value in rows:
                table.add_row(key, value)
            self.out.print(table)
        else:
            for key, value in rows:
                self.out.print(f"{key}: {value}", markup=False)


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


@contextmanager
def quiet_ctrl_c() -> Iterator[None]:
    """Stop the terminal echoing ^C into the answer being written (ECHOCTL off while an
    answer streams); "[stopped]" says what happened instead."""
    try:
        import termios

        fd = sys.stdin.fileno()
        # termios.error is not an OSError: a pipe on stdin raised it (ENOTTY) out of chat.
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError, AttributeError):  # Windows, a closed stdin
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHOCTL
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def run_chat(
    llm: LLM, params: SamplingParams, system: str | None, verbose: bool, out: Console
) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # Windows
        pass
    ChatSession(llm, params, system, verbose, out).run()
