"""Ranks 1..N-1 of a tensor-parallel engine: load the model, hold a shard of its weights
and of every layer's KV pool, and run the steps rank 0 describes, until it says stop.

`python -m nanovllm_mlx.parallel.worker '{"model": ..., "options": {...}}'` is how rank 0
spawns a local rank; under mlx.launch, the user's own command reaches `run` through
serve_other_rank, which the entry points (LLM, the CLI's commands) call first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

# The package's __init__ (run first, as for any module of it) loads the fast BLAS.
import mlx.core as mx

from nanovllm_mlx.config import Config
from nanovllm_mlx.engine.runner.model_runner import ModelRunner
from nanovllm_mlx.engine.setup import kv_formats, load_model, max_model_len
from nanovllm_mlx.errors import TensorParallelError
from nanovllm_mlx.parallel import group as groups
from nanovllm_mlx.parallel.channel import Channel
from nanovllm_mlx.parallel.records import COPY, STOP, Mirror, decode
from nanovllm_mlx.parallel.runner import fingerprint

# A spawned rank that fails at start-up waits this long before exiting: rank 0 usually
# fails the same way (the same model, the same check) and reports it in one line; a rank
# that exits first fills rank 0's terminal with the transport's closed-socket lines.
STARTUP_GRACE_S = 3.0


def serve_other_rank(model: str | None, options: dict[str, Any]) -> None:
    """Under mlx.launch every rank runs the caller's program: on every rank but 0 of a
    tensor-parallel engine, serve the steps rank 0 sends, then end the process. Returns on
    rank 0 and without tensor parallelism. Entry points call it before doing anything of
    their own (binding a port, reading stdin, printing)."""
    if options.get("tensor_parallel_size", 1) > 1:
        rank = groups.launched_rank()
        if rank is not None and rank > 0:
            sys.exit(run(model, options))


def run(model: str | None, options: dict) -> int:
    """Serve steps until rank 0 stops; the process's exit code."""
    rank = groups.launched_rank()
    started = False
    try:
        config = Config(model=model or "", **options)
        groups.watch_parent()
        group = groups.join(config.tensor_parallel_size, "NANOVLLM_TP_PARENT" in os.environ)
        channel = Channel(group)
        loaded = load_model(config)
        loaded.model.shard(group)
        context = max_model_len(config, loaded.model.spec)
        channel.gather([fingerprint(loaded, config, context)])
        (num_blocks,) = channel.broadcast(None)
        if num_blocks == 0:
            raise TensorParallelError("this rank's model, options or versions differ from rank 0's")
        runner = ModelRunner(
            loaded.model,
            num_blocks,
            config.block_size,
            loaded.dtype,
            collective=True,
            kv_formats=kv_formats(config, loaded.dtype),
        )
        mirror = Mirror()
        started = True
        while True:
            record = decode(channel.broadcast(None))
            if record.kind == STOP:
                return 0
            if record.kind == COPY:
                runner.copy_blocks(record.copies)
                mx.eval(runner.cache_arrays())
            else:
                runner.run_forward(mirror.batch(record))
    except Exception as e:  # one line for rank 0 to quote
        print(f"error: rank {rank}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        if not started and "NANOVLLM_TP_PARENT" in os.environ:
            time.sleep(STARTUP_GRACE_S)
        return 1


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    return run(spec["model"], spec["options"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
