"""Every failure a user can cause, as one `error: ...` line on stderr that names the flag."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from cli import ui
from nanovllm_mlx.errors import TensorParallelError

# Typer (>= 0.20) vendors its own Click and exports some of its exceptions, not their base
# class: reach that through one it does export, whichever Click is underneath.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

# Engine errors name Python fields (max_tokens, kv_cache_gb): those with an underscore
# anywhere, and a lone word where it leads the message ("temperature must be >= 0").
_FIELD = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b|^[a-z][a-z0-9]*\b")


def in_flag_names(message: str, flags: dict[str, str]) -> str:
    """The message with each field that is also a command-line option written as its flag,
    so that `--max-tokens -5` is answered in the words the user typed."""
    return _FIELD.sub(lambda m: flags.get(m.group(0), m.group(0)), message)


class Group(TyperGroup):
    """Turns every failure a user can cause into one `error: ...` line on stderr.

    Click/Typer would print a usage block or a boxed panel for a bad flag, and an engine
    ValueError would end in a traceback. Overriding main() covers both the console script
    and Typer's CliRunner, which calls main() directly.
    """

    def flags(self) -> dict[str, str]:
        """Option name -> its long flag, over every command (a name means one flag)."""
        names: dict[str, str] = {}
        for command in self.commands.values():
            for param in command.params:
                longs = [o for o in param.opts if o.startswith("--")]
                if param.name and longs:
                    names.setdefault(param.name, longs[0])
        return names

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
        except (ValueError, OSError, TensorParallelError) as e:
            # Bad option values, prompts too long, missing or corrupt models.
            ui.print_error(in_flag_names(ui.one_line(e), self.flags()))
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
