"""`nanovllm chat`: a REPL over the chat template, one streamed answer per turn.

Every turn re-renders the whole conversation; its tokens start with the previous turn's
prompt and answer, so the engine's prefix cache finds those blocks and only the new
message is computed.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import closing
from types import FrameType

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.ask import FALLBACK_STOP
from cli.ui import sanitize
from nanovllm_mlx import LLM, SamplingParams

PROMPT = ">>> "
HELP = (
    "/reset  forget the conversation\n"
    "/stats  prefix-cache reuse and KV-cache use\n"
    "/exit   leave (or Ctrl-D); Ctrl-C stops an answer"
)


class StopFlag:
    """Turns SIGINT into a flag while an answer streams, so the engine is only ever
    interrupted between steps (a KeyboardInterrupt mid-step could leave it inconsistent).
    A second Ctrl-C in the same answer raises KeyboardInterrupt as an escape hatch."""

    def __init__(self) -> None:
        self.hit = False
        self._previous: object = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self) -> StopFlag:
        self.hit = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


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
            prompt = self.llm.tokenizer.encode_chat(self.messages)
            request_id = self.engine.add_request(prompt, self.params)
        except ValueError as e:
            # Typically the conversation outgrew the context: keep the history as it was.
            self.messages.pop()
            self.out.print(f"[bold red]error:[/] {escape(str(e))} [dim](/reset starts over)[/]")
            return
        answer, stopped = self.stream(request_id, len(prompt))
        if answer:
            # Kept even when stopped by Ctrl-C: the model remembers what the user saw, and
            # the blocks it already wrote stay reusable.
            self.messages.append({"role": "assistant", "content": answer})
            self.turns += 1
        else:
            self.messages.pop()  # nothing said: as if the question was never asked

    def stream(self, request_id: str, prompt_tokens: int) -> tuple[str, bool]:
        start = time.perf_counter()
        first = None
        answer = ""
        cached = outputs_n = 0
        stopped = False
        write = sys.stdout.write
        with StopFlag() as flag, closing(self.engine.iterate([request_id])) as steps:
            for outputs in steps:
                for out in outputs:
                    if out.token_ids:
                        first = first or time.perf_counter()
                    cached, outputs_n = out.num_cached_tokens, out.num_output_tokens
                    delta = sanitize(out.text.lstrip() if not answer else out.text)
                    answer += delta
                    write(delta)
                    sys.stdout.flush()
                if flag.hit:
                    stopped = True  # leaving the loop closes the iterator: an abort
                    break
        write("\n")
        if stopped:
            self.out.print("[stopped]", style="dim", markup=False)
        end = time.perf_counter()
        decode_s = end - first if first else 0.0
        self.last = {
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached,
            "output_tokens": outputs_n,
            "ttft_s": (first - start) if first else 0.0,
            "tok_s": outputs_n / decode_s if decode_s > 0 else 0.0,
        }
        if self.verbose:
            last = self.last
            self.out.print(
                f"[dim]prompt {prompt_tokens} tokens ({cached} from cache) · "
                f"{outputs_n} tokens · {last['tok_s']:.1f} tok/s · "
                f"first token {last['ttft_s']:.3f} s[/]"
            )
        return answer.strip(), stopped

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
                f"{last.get('output_tokens', 0)} tokens, {last.get('tok_s', 0.0):.1f} tok/s",
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


def run_chat(
    llm: LLM, params: SamplingParams, system: str | None, verbose: bool, out: Console
) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # Windows
        pass
    ChatSession(llm, params, system, verbose, out).run()
