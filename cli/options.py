"""Options shared by several commands, declared once.

A command asks for a group with a decorator (`@engine_options`, `@sampling_options`);
the group's options are appended to its signature, so Typer shows and parses them like the
command's own, and the command receives their values as one dict (`engine=`,
`sampling=`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

import typer
from typer.core import TyperOption

from nanovllm_mlx.config import KV_CACHE_DTYPES

ENGINE = "Engine"


def _flags_show_no_type() -> None:
    """Typer's help prints a type after every option, `<bool>` for flags too, which reads as
    if `--verbose true` were the way to write it (and `true` then became a prompt). A flag
    takes no value, so it gets no type column, as in Click's own help."""
    typed = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else typed(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_type()
SAMPLING = "Sampling"

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model directory, GGUF file or Hub repo id. Default: the engine's default model.",
    ),
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
System = Annotated[str | None, typer.Option(help="System message for the chat template.")]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print timings, memory and backend.")
]


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


KVCacheDType = Enum("KVCacheDType", {v: v for v in KV_CACHE_DTYPES}, type=str)  # type: ignore[misc]


def _kv_dtype_option(flag: str, help: str) -> tuple[Any, Any]:
    return (
        Annotated[
            KVCacheDType | None,  # type: ignore[valid-type]
            typer.Option(flag, help=help, rich_help_panel=ENGINE, show_default=False),
        ],
        None,
    )


class Speculative(str, Enum):
    ngram = "ngram"
    draft = "draft"


# name -> (annotation, default) of each group's options, in --help order.
ENGINE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "dtype": (
        Annotated[
            DType | None,
            typer.Option(
                help="Compute dtype (default auto: float32 on CPU, the checkpoint's on a GPU).",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "max_num_seqs": (
        Annotated[
            int | None, typer.Option(help="Most sequences in one batch.", rich_help_panel=ENGINE)
        ],
        None,
    ),
    "max_num_batched_tokens": (
        Annotated[
            int | None,
            typer.Option(help="Most tokens computed in one step.", rich_help_panel=ENGINE),
        ],
        None,
    ),
    "kv_cache_gb": (
        Annotated[
            float | None,
            typer.Option(
                "--kv-cache-gb",
                help="KV cache size in GB (default: from device memory).",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "kv_cache_dtype": _kv_dtype_option(
        "--kv-cache-dtype",
        "KV cache storage: auto (the compute dtype), float16, bfloat16, or int8/int4 "
        "quantized at write time (about 1.9x/3.5x the tokens of float16 in the same memory).",
    ),
    "kv_cache_dtype_k": _kv_dtype_option(
        "--kv-cache-dtype-k", "KV cache storage for K alone (default: --kv-cache-dtype)."
    ),
    "kv_cache_dtype_v": _kv_dtype_option(
        "--kv-cache-dtype-v", "KV cache storage for V alone (default: --kv-cache-dtype)."
    ),
    "max_model_len": (
        Annotated[
            int | None,
            typer.Option(help="Context length cap (default: the model's).", rich_help_panel=ENGINE),
        ],
        None,
    ),
    "quantize": (
        Annotated[
            int | None,
            typer.Option(
                help="Quantize weights at load time to 4 or 8 bits.", rich_help_panel=ENGINE
            ),
        ],
        None,
    ),
    "tensor_parallel_size": (
        Annotated[
            int | None,
            typer.Option(
                "--tensor-parallel-size",
                "-tp",
                help="Split the model across this many processes (spawned on this host, "
                "or the ranks of an mlx.launch).",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "keep_quantized": (
        Annotated[
            bool | None,
            typer.Option(
                "--keep-quantized/--dequantize",
                help="Keep a quantized model's weights quantized (default: on GPUs; on CPU "
                "they are dequantized at load, where MLX's quantized matmul is slow).",
                show_default=False,
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "speculative": (
        Annotated[
            Speculative | None,
            typer.Option(
                help="Speculative decoding: ngram proposes tokens by prompt lookup (the last "
                "n tokens matched in the prompt and output), draft a smaller model's greedy "
                "tokens (--draft-model); the model verifies them in one pass.",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "draft_model": (
        Annotated[
            str | None,
            typer.Option(
                help="Draft model for --speculative draft: a directory, GGUF file or Hub "
                "repo id, of the model's tokenizer (a smaller model of its family).",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "num_speculative_tokens": (
        Annotated[
            int | None,
            typer.Option(
                help="Most tokens a sequence proposes a step (default 4; adapts below it).",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "prompt_lookup_min": (
        Annotated[
            int | None,
            typer.Option(
                "--prompt-lookup-min",
                "--ngram-min",
                help="Shortest n-gram matched (default 2).",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
    "prompt_lookup_max": (
        Annotated[
            int | None,
            typer.Option(
                "--prompt-lookup-max",
                "--ngram-max",
                help="Longest n-gram matched, tried first (default 4).",
                rich_help_panel=ENGINE,
            ),
        ],
        None,
    ),
}

SAMPLING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "temperature": (Temperature, 0.0),
    "top_p": (
        Annotated[float, typer.Option(help="Nucleus sampling mass.", rich_help_panel=SAMPLING)],
        1.0,
    ),
    "top_k": (
        Annotated[
            int,
            typer.Option(help="Sample from the k likeliest; 0: off.", rich_help_panel=SAMPLING),
        ],
        0,
    ),
    "min_p": (
        Annotated[
            float,
            typer.Option(
                help="Drop tokens below min-p × the top probability.", rich_help_panel=SAMPLING
            ),
        ],
        0.0,
    ),
    "seed": (
        Annotated[int | None, typer.Option(help="Sampling seed.", rich_help_panel=SAMPLING)],
        None,
    ),
}


def _with_group(
    into: str, group: dict[str, tuple[Any, Any]], convert: Callable[[dict], dict]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)  # Typer needs real annotations
        own = [p for p in sig.parameters.values() if p.name != into]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=d)
            for name, (ann, d) in group.items()
        ]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = convert({name: kwargs.pop(name) for name in group})
            if into == "engine":
                serve_as_other_rank(kwargs.get("model"), values)
            return fn(*args, **kwargs, **{into: values})

        command.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        return command

    return decorate


def serve_as_other_rank(model: str | None, engine: dict[str, Any]) -> None:
    """Under mlx.launch every rank runs the user's command; all but rank 0 serve the steps
    rank 0 sends, before the command does anything of its own (binding a port, reading
    stdin, printing), and then exit."""
    from nanovllm_mlx.parallel import worker

    worker.serve_other_rank(model, engine)


def _given_engine_options(values: dict[str, Any]) -> dict[str, Any]:
    """Only the options given on the command line: the engine's own defaults stay
    authoritative for the rest."""
    given = {k: v for k, v in values.items() if v is not None}
    return {k: v.value if isinstance(v, Enum) else v for k, v in given.items()}


engine_options = _with_group("engine", ENGINE_OPTIONS, _given_engine_options)
sampling_options = _with_group("sampling", SAMPLING_OPTIONS, dict)
