"""`nanovllm bench`: the live dashboard and the summary table."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli import ui
from nanovllm_mlx import LLM

REFRESH_S = 0.2  # 5 Hz: a redraw costs ~1 ms, well under 1% of the steps between two
PLAIN_EVERY_S = 10.0  # without a terminal: one progress line on stderr this often


class Dashboard:
    """Called from the benchmark's step loop (on_step); redraws at most every REFRESH_S, and
    only then pays for llm.stats(), so the engine runs at full speed between redraws."""

    def __init__(self, llm: LLM, console: Console, title: str):
        self.llm = llm
        self.console = console
        self.title = title
        self.live: Live | None = None
        self.echo = ui.unechoed(console)
        self.last = 0.0
        # The bar counts output tokens, whose total is known in advance (EOS is ignored);
        # requests finish in bursts.
        self.progress = Progress(
            TextColumn("{task.fields[finished]}/{task.fields[requests]} finished"),
            BarColumn(bar_width=None),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[left]}"),
            console=console,
            expand=True,
        )
        self.task = self.progress.add_task("tokens", total=None, finished=0, requests=0, left="")

    def __enter__(self) -> Dashboard:
        if self.console.is_terminal:
            self.echo.__enter__()
            self.live = Live(console=self.console, auto_refresh=False, transient=True)
            self.live.__enter__()
        self.last = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.echo.__exit__(None, None, None)

    def __call__(self, progress: dict) -> None:
        now = time.perf_counter()
        if self.live is None:
            if now - self.last >= PLAIN_EVERY_S:
                self.last = now
                s = self.llm.stats()
                self.console.print(
                    f"bench: {progress['finished']}/{progress['total']} finished, "
                    f"{progress['output_tokens']} tokens in {progress['elapsed']:.0f} s, "
                    f"{time_left(progress)}, running {s['running']}, waiting {s['waiting']}",
                    markup=False,
                )
            return
        if now - self.last < REFRESH_S and progress["finished"] < progress["total"]:
            return
        self.last = now
        self.progress.update(
            self.task,
            total=progress["total_output_tokens"],
            completed=progress["output_tokens"],
            finished=progress["finished"],
            requests=progress["total"],
            left=time_left(progress),
        )
        panel = self.render(self.llm.stats(), progress)
        with ui.interrupts_held():
            self.live.update(panel, refresh=True)

    def render(self, s: dict, progress: dict) -> Panel:
        grid = Table.grid(padding=(0, 2), expand=True)
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(ratio=1)
        grid.add_row(
            "requests",
            f"running {s['running']}  ·  waiting {s['waiting']}  ·  "
            f"batch {s['batch_size']} seqs / {s['batch_tokens']} tokens",
        )
        used, total = s["kv_blocks_used"], s["kv_blocks_total"]
        kv = Table.grid(padding=(0, 1), expand=True)
        kv.add_column(ratio=1)
        kv.add_column(no_wrap=True)
        kv.add_row(
            ProgressBar(total=max(total, 1), completed=used),
            f"{used}/{total} ({used / max(total, 1):.0%}), {s['kv_blocks_cached']} cached",
        )
        grid.add_row("KV blocks", kv)
        grid.add_row(
            "prefix cache",
            f"hit rate {s['prefix_hit_rate']:.1%}  ·  {s['prefix_hit_tokens']} tokens reused",
        )
        elapsed = progress["elapsed"]
        overall = progress["output_tokens"] / elapsed if elapsed > 0 else 0.0
        grid.add_row(
            "throughput",
            f"prefill {s['prompt_tok_s']:,.0f} tok/s  ·  decode {s['generation_tok_s']:,.0f} "
            f"tok/s  ·  overall {overall:,.0f} output tok/s",
        )
        grid.add_row(
            "",
            Text(
                f"{progress['output_tokens']:,} tokens out  ·  preemptions {s['preemptions']}"
                f"  ·  peak memory {s['peak_memory_gb']:.2f} GB",
                style="dim",
            ),
        )
        return Panel(Group(grid, self.progress), title=self.title, title_align="left", expand=True)


def seconds_left(progress: dict) -> float | None:
    """The time so far scaled by the tokens still to compute over those computed: each
    output token is one more row through the model, as each prompt token is, and on a
    CPU a step's time follows the rows it computes. New prompts share steps with decodes
    until the last is read, so no rate of one kind alone is seen until late. None until
    something has been computed."""
    done = progress["prefill_tokens"] + progress["output_tokens"]
    total = progress["total_prompt_tokens"] + progress["total_output_tokens"]
    if done <= 0 or progress["elapsed"] <= 0:
        return None
    return progress["elapsed"] * max(total - done, 0) / done


def time_left(progress: dict) -> str:
    """'about 12 min left', 'about 40 s left', or 'estimating the time left'."""
    seconds = seconds_left(progress)
    if seconds is None:
        return "estimating the time left"
    if seconds >= 90:
        return f"about {seconds / 60:,.0f} min left"
    return f"about {seconds:.0f} s left"


def summary_table(result: dict) -> Table:
    table = Table(
        title="nanovllm bench",
        title_justify="left",
        caption=result["backend"],
        caption_justify="left",
        show_header=False,
    )
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    rows = [
        ("model", f"{result['model']} ({result['dtype']})"),
        ("requests", f"{result['num_seqs']:,}"),
        ("prompt tokens", f"{result['prompt_tokens']:,}"),
        ("output tokens", f"{result['output_tokens']:,}"),
        ("time", f"{result['seconds']:.2f} s"),
        ("throughput", f"{result['throughput']:,.1f} tok/s"),
        ("prefill", f"{result['prefill_throughput']:,.1f} tok/s"),
        ("decode", f"{result['decode_throughput']:,.1f} tok/s"),
        ("mean batch size", f"{result['mean_batch_size']:.1f}"),
        ("time to first token", f"{result['ttft_mean_s']:.2f} s mean"),
        ("preemptions", f"{result['preemptions']:,}"),
        (
            "KV blocks",
            f"{result['kv_blocks_total']:,} × {result['block_size']} tokens "
            f"({result.get('kv_cache_dtype', 'auto')})",
        ),
        ("peak memory", f"{result['peak_memory_gb']:.2f} GB"),
    ]
    if result.get("speculative"):
        rows.append(
            (
                "speculation",
                f"{result['speculative']}: acceptance {result['spec_acceptance_rate']:.1%}, "
                f"{result['spec_tokens_per_step']:.2f} tokens a step, "
                f"{result['spec_drafts']:,} drafts",
            )
        )
    if result["requests_shortened"]:
        rows.append(
            (
                "shortened",
                f"{result['requests_shortened']} requests to fit {result['max_model_len']} tokens",
            )
        )
    for key, value in rows:
        table.add_row(key, str(value))
    return table
