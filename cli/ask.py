"""`nanovllm ask`: one or more prompts, run as one continuous batch, answers streamed."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace

import mlx.core as mx
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from cli.ui import interrupts_held, interrupts_kept, sanitize, unechoed
from nanovllm_mlx import LLM, LLMEngine, SamplingParams, backend
from nanovllm_mlx.engine import requests
from nanovllm_mlx.errors import InvalidRequestError

REFRESH_S = 0.1  # the live view redraws at most 10 times a second, between engine steps
FALLBACK_STOP = "\nUser:"  # base models under the fallback template would write both sides


@dataclass
class Answer:
    index: int
    prompt: str
    request_id: str = ""
    text: str = ""  # what is shown: the generated text without its leading whitespace
    first_token_at: float | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, delta: str) -> str:
        """Append a delta; return the part to display (leading whitespace dropped)."""
        if not self.text:
            delta = delta.lstrip()
        delta = sanitize(delta)
        self.text += delta
        return delta


def build_inputs(
    llm: LLM, prompts: list[str], use_chat: bool, system: str | None
) -> list[list[int]]:
    if not use_chat:
        return [llm.tokenizer.encode(p) for p in prompts]
    head = [{"role": "system", "content": system}] if system else []
    return [llm.tokenizer.encode_chat([*head, {"role": "user", "content": p}]) for p in prompts]


def fit_max_tokens(
    engine: LLMEngine, inputs: list[list[int]], params: SamplingParams
) -> tuple[list[SamplingParams], list[str]]:
    """One SamplingParams per prompt, max_tokens capped to the room its context leaves
    (the engine would stop there anyway); notes saying so, in the flags' names."""
    fitted, notes = [], []
    for i, ids in enumerate(inputs):
        room = requests.room(len(ids), engine.max_model_len)
        if 0 < room < params.max_tokens:
            fitted.append(replace(params, max_tokens=room))
            which = f" for prompt {i + 1}" if len(inputs) > 1 else ""
            notes.append(
                f"--max-tokens {params.max_tokens} capped to {room}{which}: the context is "
                f"{engine.max_model_len} tokens (--max-model-len) and the prompt has {len(ids)}"
            )
        else:
            fitted.append(params)  # a prompt that fills the context is the engine's error
    return fitted, notes


def drive(
    engine: LLMEngine, answers: list[Answer], on_step: Callable[[], None] | None = None
) -> Iterator[tuple[Answer, str]]:
    """Run the answers' requests to the end; yield (answer, displayable delta) as they
    come, and call on_step after every step. Leaving early (Ctrl-C, an error) aborts what
    is still running."""
    by_id = {a.request_id: a for a in answers}
    with interrupts_kept() as check_interrupt, closing(engine.iterate(by_id)) as steps:
        for outputs in steps:
            check_interrupt()
            if on_step is not None:
                on_step()
            now = time.perf_counter()
            for out in outputs:
                answer = by_id[out.request_id]
                if answer.first_token_at is None and out.token_ids:
                    answer.first_token_at = now
                answer.num_prompt_tokens = out.num_prompt_tokens
                answer.num_cached_tokens = out.num_cached_tokens
                answer.num_output_tokens = out.num_output_tokens
                if out.finished:
                    answer.finished = True
                    answer.finish_reason = out.finish_reason
                yield answer, answer.add(out.text)


def label(answer: Answer, total: int) -> str:
    return f"[{answer.index + 1}/{total}] {sanitize(answer.prompt)}"


def stream_one(engine: LLMEngine, answer: Answer, err: Console) -> None:
    """The answer streamed to stdout; on a terminal, a spinner on stderr until the first
    token says how far the prompt's prefill has got."""
    out = sys.stdout
    status = err.status("prefilling the prompt…", spinner="dots") if err.is_terminal else None

    def show_progress() -> None:
        progress = engine.progress(answer.request_id)
        if status is not None and progress is not None and answer.first_token_at is None:
            done, total = progress
            status.update(f"prefilling the prompt: {done:,}/{total:,} tokens…")

    written = False
    try:
        with status or nullcontext():
            for _, delta in drive(engine, [answer], show_progress):
                if delta:
                    if status is not None:
                        status.stop()  # the answer takes the terminal from here
                        status = None
                    out.write(delta)
                    out.flush()
                    written = True
    except BaseException:
        if written:  # Ctrl-C or an error mid-answer: the shell's prompt gets its own line
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()


def print_in_order(engine: LLMEngine, answers: list[Answer], console: Console) -> None:
    """Plain output: each answer under its label, in input order, as soon as it and every
    answer before it are finished (so the order never depends on timing)."""
    total, shown = len(answers), 0
    try:
        for _ in drive(engine, answers):
            while shown < total and answers[shown].finished:
                _print_answer(console, answers[shown], total)
                shown += 1
    except KeyboardInterrupt:
        _print_unfinished(console, answers[shown:], total)
        raise


def _print_answer(console: Console, answer: Answer, total: int) -> None:
    head = Text(label(answer, total), style="bold cyan")
    if not answer.finished:
        head.append(" · interrupted", style="dim")
    console.print(head, soft_wrap=True)
    console.print(Text(answer.text), soft_wrap=True)
    console.print()


def _print_unfinished(console: Console, answers: list[Answer], total: int) -> None:
    """On Ctrl-C, what the answers not yet printed had got to: the work is not thrown away
    along with the live view that showed it."""
    for answer in answers:
        _print_answer(console, answer, total)


def live_view(engine: LLMEngine, answers: list[Answer], console: Console) -> None:
    """Terminal output: a live panel tails every unfinished answer; finished answers are
    printed in full above it, in input order."""
    total, shown = len(answers), 0
    last = 0.0
    try:
        with (
            unechoed(console),
            Live(console=console, auto_refresh=False, transient=True) as live,
        ):
            for _ in drive(engine, answers):
                while shown < total and answers[shown].finished:
                    _print_answer(live.console, answers[shown], total)
                    shown += 1
                now = time.perf_counter()
                if now - last >= REFRESH_S:
                    view = _render_live(engine, answers[shown:], total, console)
                    with interrupts_held():
                        live.update(view, refresh=True)
                    last = now
    except KeyboardInterrupt:
        _print_unfinished(console, answers[shown:], total)  # the live view is gone by now
        raise


def _waiting_state(engine: LLMEngine, answer: Answer) -> str:
    progress = engine.progress(answer.request_id)
    if progress is None or progress[0] == 0:
        return "waiting"
    return f"prefill {progress[0] / max(progress[1], 1):.0%}"


def _render_live(engine: LLMEngine, answers: list[Answer], total: int, console: Console) -> Group:
    width = max(console.width - 4, 20)
    room = max(console.height // 2 - 1, 1)  # two lines per answer
    lines: list[Text] = []
    for answer in answers[:room]:
        state = (
            "done"
            if answer.finished
            else f"{answer.num_output_tokens} tokens"
            if answer.first_token_at
            else _waiting_state(engine, answer)
        )
        head = Text(label(answer, total)[: width - len(state) - 3], style="bold cyan")
        head.append(f" · {state}", style="dim")
        tail = answer.text.replace("\n", " ⏎ ")[-width:]
        lines += [head, Text("  " + tail, no_wrap=True, overflow="crop")]
    if len(answers) > room:
        lines.append(Text(f"… and {len(answers) - room} more", style="dim"))
    return Group(*lines)


def verbose_report(
    err: Console,
    engine: LLMEngine,
    answers: list[Answer],
    start: float,
    end: float,
) -> None:
    """mlx-lm's summary lines; batch figures are totals over all requests."""
    prompt_tokens = sum(a.num_prompt_tokens for a in answers)
    cached = sum(a.num_cached_tokens for a in answers)
    output_tokens = sum(a.num_output_tokens for a in answers)
    firsts = [a.first_token_at for a in answers if a.first_token_at is not None]
    prefill_s = max(firsts) - start if firsts else 0.0
    decode_s = end - min(firsts) if firsts else 0.0
    prompt_tps = prompt_tokens / prefill_s if prefill_s > 0 else 0.0
    # Each answer's first token comes out of its prefill: the rate counts the others.
    decode_tokens = output_tokens - len(firsts)
    gen_tps = decode_tokens / decode_s if decode_s > 0 and decode_tokens > 0 else 0.0
    err.print("=" * 10)
    err.print(
        f"Prompt: {prompt_tokens} tokens, {prompt_tps:.3f} tokens-per-sec"
        + (f" ({cached} from the prefix cache)" if cached else "")
    )
    err.print(f"Generation: {output_tokens} tokens, {gen_tps:.3f} tokens-per-sec")
    stats = engine.stats()
    if stats.get("spec_drafts"):
        err.print(
            f"Speculation: {stats['speculative']}, {stats['spec_acceptance_rate']:.1%} of "
            f"{stats['spec_draft_tokens']} proposed tokens accepted, "
            f"{stats['spec_tokens_per_step']:.2f} tokens per verifying step"
        )
    if len(firsts) > 1:
        err.print(
            f"Time to first token: {min(firsts) - start:.3f} s (first request), "
            f"{max(firsts) - start:.3f} s (last); {len(answers)} requests in one batch"
        )
    elif firsts:
        err.print(f"Time to first token: {firsts[0] - start:.3f} s")
    err.print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    err.print(f"Backend: {backend.describe()}")
    err.print(
        f"Engine: {engine.model_name} ({engine.quantization}), "
        f"{str(engine.dtype).removeprefix('mlx.core.')}, "
        f"{engine.max_num_batched_tokens} tokens a step, "
        f"{engine.stats()['kv_blocks_total']:,} KV blocks of {engine.config.block_size} "
        f"({engine.stats()['kv_cache_tokens']:,} tokens, {engine.kv_cache_dtype})"
    )
    phases = ", ".join(f"{name} {s:.2f}" for name, s in engine.startup_s.items())
    err.print(f"Start-up: {sum(engine.startup_s.values()):.2f} s ({phases})")


def run_ask(
    llm: LLM,
    prompts: list[str],
    params: SamplingParams,
    use_chat: bool,
    system: str | None,
    verbose: bool,
    out: Console,
    err: Console,
) -> None:
    engine = llm.engine
    if use_chat and not llm.tokenizer.has_chat_template:
        params.stop = [*params.stop, FALLBACK_STOP]
    inputs = build_inputs(llm, prompts, use_chat, system)
    fitted, notes = fit_max_tokens(engine, inputs, params)
    for note in notes:  # before the answer: a cut answer must not look like a whole one
        err.print(f"note: {note}", markup=False, highlight=False)
    start = time.perf_counter()
    try:
        ids = engine.add_requests(inputs, fitted)
    except InvalidRequestError as e:
        raise InvalidRequestError(
            f"prompt {e.index + 1}: {e}" if len(inputs) > 1 else str(e), e.param, e.code
        ) from e
    answers = [Answer(i, p, rid) for i, (p, rid) in enumerate(zip(prompts, ids))]
    if len(answers) == 1:
        stream_one(engine, answers[0], err)
    elif out.is_terminal:
        live_view(engine, answers, out)
    else:
        print_in_order(engine, answers, out)
    if verbose:
        verbose_report(err, engine, answers, start, time.perf_counter())
