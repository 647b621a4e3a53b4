"""`nanovllm serve`: bind the port, load the model, serve, and show how the server is doing.

On a terminal a Rich live panel (running and waiting requests, batch, KV cache, prefix
cache, throughput, errors) redraws twice a second, with uvicorn's own log lines printed
above it and per-request access lines left out (the panel counts requests). When stderr
is not a terminal, or with --no-live, uvicorn logs as usual and a vLLM-style stats line
follows every --log-interval seconds while the server is busy. Both read the snapshot the
engine thread publishes, so neither ever waits for an engine step.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli import ui
from nanovllm_mlx.errors import TensorParallelError
from nanovllm_mlx.serving.settings import ServerSettings
from nanovllm_mlx.serving.snapshot import EngineSnapshot

REFRESH_PER_S = 2
RATE_WINDOW_S = 5.0  # the panel's tok/s and req/s: averaged over the last 5 s
LOGGERS = ("uvicorn", "uvicorn.error", "nanovllm_mlx")
stats_logger = logging.getLogger("nanovllm_mlx.serving.stats")


@dataclass(frozen=True)
class Rates:
    prompt_tok_s: float
    generation_tok_s: float
    requests_s: float

    @classmethod
    def between(cls, old: EngineSnapshot, new: EngineSnapshot) -> Rates:
        dt = new.time - old.time
        if dt <= 0:
            return cls(0.0, 0.0, 0.0)
        return cls(
            (new.prompt_tokens - old.prompt_tokens) / dt,
            (new.generation_tokens - old.generation_tokens) / dt,
            (new.requests_finished - old.requests_finished) / dt,
        )


def stats_line(snap: EngineSnapshot, rates: Rates) -> str:
    """vLLM's periodic stats line, so log scrapers written for vLLM read ours."""
    usage = snap.kv_blocks_used / max(snap.kv_blocks_total, 1)
    return (
        f"Avg prompt throughput: {rates.prompt_tok_s:.1f} tokens/s, "
        f"Avg generation throughput: {rates.generation_tok_s:.1f} tokens/s, "
        f"Running: {snap.running} reqs, Waiting: {snap.waiting} reqs, "
        f"KV cache usage: {usage:.1%}, Prefix cache hit rate: {snap.prefix_hit_rate:.1%}"
    )


def render_panel(
    snap: EngineSnapshot,
    rates: Rates,
    totals: dict[str, float],
    title: str,
    max_waiting: int | None,
    uptime_s: float,
) -> Panel:
    grid = Table.grid(padding=(0, 2), expand=True)
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(ratio=1)
    limit = f" / {max_waiting}" if max_waiting is not None else ""
    grid.add_row(
        "requests",
        f"running {snap.running}  ·  waiting {snap.waiting}{limit}  ·  "
        f"batch {snap.batch_size} seqs (peak {snap.peak_batch_size})",
    )
    used, total = snap.kv_blocks_used, max(snap.kv_blocks_total, 1)
    kv = Table.grid(padding=(0, 1), expand=True)
    kv.add_column(ratio=1)
    kv.add_column(no_wrap=True)
    kv.add_row(
        ProgressBar(total=total, completed=used),
        f"{used}/{snap.kv_blocks_total} blocks ({used / total:.0%}), "
        f"{snap.kv_blocks_cached} cached",
    )
    grid.add_row("KV cache", kv)
    grid.add_row("prefix cache", f"hit rate {snap.prefix_hit_rate:.1%}")
    if snap.spec_drafts:
        grid.add_row(
            "speculation",
            f"acceptance {snap.spec_acceptance_rate:.1%}  ·  "
            f"{snap.spec_tokens_per_step:.2f} tokens a step  ·  {snap.spec_drafts:,} drafts",
        )
    grid.add_row(
        "throughput",
        f"prompt {rates.prompt_tok_s:,.1f} tok/s  ·  generation {rates.generation_tok_s:,.1f} "
        f"tok/s  ·  {rates.requests_s:,.2f} req/s",
    )
    finished = int(totals.get("stop", 0) + totals.get("length", 0))
    errors = int(totals.get("error", 0))
    grid.add_row(
        "done",
        Text(
            f"{finished:,} answered  ·  {errors} errors  ·  {int(totals.get('timeout', 0))} "
            f"timed out  ·  {int(totals.get('abort', 0))} abandoned  ·  "
            f"{int(totals.get('rejected', 0))} refused",
            style="red" if errors else "",
        ),
    )
    hours, rest = divmod(int(uptime_s), 3600)
    grid.add_row(
        "",
        Text(
            f"up {hours:d}:{rest // 60:02d}:{rest % 60:02d}  ·  {snap.steps:,} steps  ·  "
            f"{snap.generation_tokens:,} tokens out  ·  preemptions {snap.preemptions}",
            style="dim",
        ),
    )
    if not snap.alive:
        grid.add_row("engine", Text("stopped", style="bold red"))
    return Panel(Group(grid), title=escape(title), title_align="left", expand=True)


class LiveView:
    """The panel, redrawn by Rich's own refresh thread from the latest snapshot."""

    def __init__(self, state: Any, console: Console, title: str):
        self.state = state
        self.console = console
        self.title = title
        self.started = time.monotonic()
        self.samples: deque[EngineSnapshot] = deque()
        self.live = Live(
            console=console,
            get_renderable=self.render,
            refresh_per_second=REFRESH_PER_S,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def render(self) -> Panel:
        snap = self.state.engine_thread.snapshot()
        self.samples.append(snap)
        while len(self.samples) > 2 and snap.time - self.samples[0].time > RATE_WINDOW_S:
            self.samples.popleft()
        return render_panel(
            snap,
            Rates.between(self.samples[0], snap),
            self.state.metrics.totals(),
            self.title,
            self.state.settings.max_waiting,
            time.monotonic() - self.started,
        )

    def __enter__(self) -> LiveView:
        # Log records print above the panel through its console; uvicorn's access lines are
        # off (serve() is called with access_log=False): one per request would bury it.
        handler = RichHandler(console=self.console, show_path=False, markup=False)
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = [handler], False
            logger.setLevel(logging.INFO)
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()


class StatsLog:
    """A thread logging stats_line() every `interval` s while the server is busy."""

    def __init__(self, state: Any, interval: float):
        self.state = state
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nanovllm-stats", daemon=True)

    def _run(self) -> None:
        last = self.state.engine_thread.snapshot()
        while not self.stopped.wait(self.interval):
            snap = self.state.engine_thread.snapshot()
            rates = Rates.between(last, snap)
            busy = snap.running or snap.waiting or snap.generation_tokens != last.generation_tokens
            if busy or snap.prompt_tokens != last.prompt_tokens:
                stats_logger.info(stats_line(snap, rates))
            last = snap

    def __enter__(self) -> StatsLog:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def plain_log_config() -> dict[str, Any]:
    """uvicorn's logging, with the engine's and the stats line's loggers on its handler."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["nanovllm_mlx"] = {"handlers": ["default"], "level": "INFO"}
    return config


def run_serve(
    model: str | None,
    host: str,
    port: int,
    settings: ServerSettings,
    engine_kwargs: dict[str, Any],
    *,
    live: bool,
    log_interval: float,
) -> None:
    from nanovllm_mlx.serving import app as server

    err = ui.console(stderr=True)
    # Before the model loads: a bad or busy port is one error line, at once.
    sock = server.bind_socket(host, port)
    try:
        name = model or "the default model"
        if err.is_terminal:
            with err.status(f"Loading {escape(name)}…", spinner="dots"):
                app = server.create_app(model, settings, **engine_kwargs)
        else:
            app = server.create_app(model, settings, **engine_kwargs)
        ui.blas_notice(err)
        state = app.state.server
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        title = f"nanovllm serve · {state.model_name} · http://{shown}:{bound_port}"
        if live and err.is_terminal:
            with LiveView(state, err, title):
                server.serve(app, sock, log_config=None, access_log=False)
        else:
            with StatsLog(state, log_interval):
                server.serve(app, sock, log_config=plain_log_config())
        fatal = app.state.engine_thread.fatal
        if fatal is not None:
            raise TensorParallelError(fatal)  # the CLI's one error line, exit 1
    finally:
        sock.close()
