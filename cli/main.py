"""The `nanovllm` command: ask, chat, bench, download, serve."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # Typer >= 0.20 vendors its own Click
    from typer._click.exceptions import ClickException
except ImportError:  # older Typer runs on the click package
    from click.exceptions import ClickException

# Imported before anything else touches mlx: it loads a fast BLAS first on Linux.
import nanovllm_mlx
from cli import ui
from nanovllm_mlx import SamplingParams


class _Group(TyperGroup):
    """Turns every failure a user can cause into one `error: ...` line on stderr.

    Click/Typer would print a usage block or a boxed panel for a bad flag, and an engine
    ValueError would end in a traceback. Overriding main() covers both the console script
    and Typer's CliRunner, which calls main() directly.
    """

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        standalone = extra.pop("standalone_mode", True)
        if not standalone:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ in ("NoArgsIsHelpError", "NoArgsIsHelp") and ctx is not None:
                # Bare `nanovllm`: help, not an error. Rich help is printed while the
                # exception is built; plain help is its message.
                if e.format_message().strip():
                    typer.echo(e.format_message())
                sys.exit(0)
            where = ctx.command_path if ctx is not None else "nanovllm"
            ui.print_error(f"{e.format_message()} (see '{where} --help')")
            sys.exit(e.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            sys.exit(130)
        except BrokenPipeError:
            # `nanovllm ask ... | head`: stop quietly; keep Python's exit-time flush silent.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (ValueError, OSError) as e:
            # Bad option values, prompts too long, missing or corrupt models.
            ui.print_error(e)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
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


# Options shared by several commands -----------------------------------------------------

ENGINE = "Engine"
SAMPLING = "Sampling"

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model directory, GGUF file or Hub repo id. Default: the engine's default model.",
    ),
]


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


Dtype = Annotated[
    DType | None,
    typer.Option(
        help="Compute dtype (default auto: float32 on CPU, the checkpoint's on a GPU).",
        rich_help_panel=ENGINE,
    ),
]
MaxNumSeqs = Annotated[
    int | None,
    typer.Option(help="Most sequences in one batch.", rich_help_panel=ENGINE),
]
MaxNumBatchedTokens = Annotated[
    int | None,
    typer.Option(help="Most tokens computed in one step.", rich_help_panel=ENGINE),
]
KvCacheGb = Annotated[
    float | None,
    typer.Option(
        "--kv-cache-gb",
        help="KV cache size in GB (default: from device memory).",
        rich_help_panel=ENGINE,
    ),
]
MaxModelLen = Annotated[
    int | None,
    typer.Option(help="Context length cap (default: the model's).", rich_help_panel=ENGINE),
]
Quantize = Annotated[
    int | None,
    typer.Option(help="Quantize weights at load time to 4 or 8 bits.", rich_help_panel=ENGINE),
]
MaxTokens = Annotated[int, typer.Option(help="Most tokens to generate per answer.")]
Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        "--temp",
        help="Sampling temperature; 0 is greedy.",
        rich_help_panel=SAMPLING,
    ),
]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass.", rich_help_panel=SAMPLING)]
TopK = Annotated[
    int, typer.Option(help="Sample from the k likeliest; 0: off.", rich_help_panel=SAMPLING)
]
MinP = Annotated[
    float,
    typer.Option(help="Drop tokens below min-p × the top probability.", rich_help_panel=SAMPLING),
]
Seed = Annotated[int | None, typer.Option(help="Sampling seed.", rich_help_panel=SAMPLING)]
Stop = Annotated[
    list[str] | None,
    typer.Option(help="Stop at this string (repeatable).", rich_help_panel=SAMPLING),
]
System = Annotated[str | None, typer.Option(help="System message for the chat template.")]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print timings, memory and backend.")
]


ENGINE_OPTIONS = (
    "dtype",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_gb",
    "max_model_len",
    "quantize",
)


def _engine_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The engine options of a command's locals() that were given on the command line: the
    engine's own defaults stay authoritative for the rest."""
    given = {k: options[k] for k in ENGINE_OPTIONS if options.get(k) is not None}
    return {k: v.value if isinstance(v, Enum) else v for k, v in given.items()}


# Commands ---------------------------------------------------------------------------------


@app.command()
def ask(
    prompt: Annotated[
        list[str],
        typer.Argument(help="One or more prompts; '-' reads prompts from stdin, one a line."),
    ],
    model: Model = None,
    max_tokens: MaxTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    stop: Stop = None,
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
    dtype: Dtype = None,
    max_num_seqs: MaxNumSeqs = None,
    kv_cache_gb: KvCacheGb = None,
    max_model_len: MaxModelLen = None,
    quantize: Quantize = None,
) -> None:
    """Answer prompts, streamed; several prompts run as one continuous batch."""
    engine_kwargs = _engine_kwargs(locals())
    from cli.ask import run_ask

    prompts: list[str] = []
    for p in prompt:
        if p == "-":
            prompts += [line.strip() for line in sys.stdin if line.strip()]
        else:
            prompts.append(p)
    if not prompts:
        raise ValueError("no prompt given (stdin was empty)")
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        max_tokens=max_tokens,
        stop=list(stop or []),
    )
    out, err = ui.console(), ui.console(stderr=True)
    llm = ui.load_llm(model, engine_kwargs, err)
    use_chat = llm.tokenizer.has_chat_template if chat is None else chat
    run_ask(llm, prompts, params, use_chat, system, verbose, out, err)


@app.command()
def chat(
    model: Model = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    system: System = None,
    verbose: Verbose = False,
    dtype: Dtype = None,
    max_num_seqs: MaxNumSeqs = None,
    kv_cache_gb: KvCacheGb = None,
    max_model_len: MaxModelLen = None,
    quantize: Quantize = None,
) -> None:
    """Chat in the terminal: /reset, /stats, /exit; Ctrl-C stops an answer."""
    engine_kwargs = _engine_kwargs(locals())
    from cli.chat import run_chat

    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        max_tokens=max_tokens,
    )
    out, err = ui.console(), ui.console(stderr=True)
    llm = ui.load_llm(model, engine_kwargs, err)
    run_chat(llm, params, system, verbose, out)


@app.command()
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
    dtype: Dtype = None,
    max_num_seqs: MaxNumSeqs = None,
    max_num_batched_tokens: MaxNumBatchedTokens = None,
    kv_cache_gb: KvCacheGb = None,
    max_model_len: MaxModelLen = None,
    quantize: Quantize = None,
) -> None:
    """Throughput on nano-vllm's workload: random prompts, random lengths, EOS ignored."""
    engine_kwargs = _engine_kwargs(locals())
    from cli.dashboard import Dashboard, summary_table
    from nanovllm_mlx.bench import make_workload, run_benchmark

    out, err = ui.console(), ui.console(stderr=True)
    # Checked before paying for the model load, in the flags' own names.
    if num_seqs < 1:
        raise ValueError(f"--num-seqs must be >= 1, got {num_seqs}")
    for low, high, what in ((min_input, max_input, "input"), (min_output, max_output, "output")):
        if not 1 <= low <= high:
            raise ValueError(f"need 1 <= --min-{what} <= --max-{what}, got {low} and {high}")
    llm = ui.load_llm(model, engine_kwargs, err)
    engine = llm.engine
    workload = make_workload(
        num_seqs, min_input, max_input, min_output, max_output, seed, engine.vocab_size
    )
    title = f"nanovllm bench · {engine.model_name} · {num_seqs} requests"
    # The dashboard is progress, not results: stderr, so stdout stays the results alone.
    with Dashboard(llm, err, title) as dashboard:
        result = run_benchmark(llm, workload, on_step=dashboard, temperature=temperature)
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
    name: Annotated[str, typer.Argument(help="A model name the engine knows, or a Hub repo id.")],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Directory to download into.")
    ] = None,
) -> None:
    """Download a model from the Hugging Face Hub (progress from huggingface_hub)."""
    from nanovllm_mlx.loading import download as downloads

    path = downloads.download(name, output)
    typer.echo(str(path))


@app.command()
def serve(
    model: Model = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require this bearer token.", envvar="NANOVLLM_API_KEY"),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model name clients use (default: the model directory's name)."),
    ] = None,
    dtype: Dtype = None,
    max_num_seqs: MaxNumSeqs = None,
    max_num_batched_tokens: MaxNumBatchedTokens = None,
    kv_cache_gb: KvCacheGb = None,
    max_model_len: MaxModelLen = None,
    quantize: Quantize = None,
) -> None:
    """Serve an OpenAI-compatible API."""
    engine_kwargs = _engine_kwargs(locals())
    from nanovllm_mlx.serving import app as server

    server.run_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        **({"model_name": served_model_name} if served_model_name else {}),
        **engine_kwargs,
    )


if __name__ == "__main__":
    app(prog_name="nanovllm")
