"""Rank 0 of a tensor-parallel engine: start the group, agree with the other ranks, and
run every step on all of them.

Rank 0 owns everything that is not the model: scheduler, block manager (prefix cache and
preemption included), tokenizer, sampler, server. Each step it broadcasts a compact record
(parallel/records.py) and then runs its shard of the model like any engine; the others run
theirs from the record. Only rank 0 samples.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any, TypeVar

import mlx.core as mx
import xxhash

from nanovllm_mlx.attention.metadata import PoolLayout
from nanovllm_mlx.config import Config
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.runner.model_runner import ModelRunner
from nanovllm_mlx.engine.sample.logprobs import RowSample
from nanovllm_mlx.errors import TensorParallelError
from nanovllm_mlx.loading.loader import LoadedModel
from nanovllm_mlx.parallel import group as groups
from nanovllm_mlx.parallel.channel import Channel
from nanovllm_mlx.parallel.records import COPY, STOP, Record, Sender, encode
from nanovllm_mlx.version import __version__


def fingerprint(loaded: LoadedModel, config: Config, max_model_len: int) -> int:
    """What every rank must agree on: the model, the engine options that shape a step,
    and the versions of this engine and of MLX."""
    blob = json.dumps(
        {
            "config": loaded.config,
            "dtype": str(loaded.dtype),
            "quantization": loaded.quantization,
            "block_size": config.block_size,
            "kv_cache_dtype": [config.kv_cache_dtype_k, config.kv_cache_dtype_v],
            "max_model_len": max_model_len,
            "tensor_parallel_size": config.tensor_parallel_size,
            "nanovllm": __version__,
            "mlx": mx.__version__,
        },
        sort_keys=True,
        default=str,
    )
    return xxhash.xxh64(blob.encode()).intdigest() >> 2  # fits an int64 collective


class TensorParallel:
    """The group as rank 0 sees it."""

    def __init__(self, config: Config):
        global _started
        if _started:
            # MLX keeps one distributed group per process, for the life of the process.
            raise TensorParallelError(
                "one tensor-parallel engine per process: this process already started one"
            )
        _started = True
        size = config.tensor_parallel_size
        spawned = groups.launched_rank() is None
        self.children: list[groups.Child] = []
        env = {}
        if spawned:
            options = {f.name: getattr(config, f.name) for f in fields(Config)}
            model = options.pop("model") or None
            self.children, hostfile = groups.spawn(size, model, options)
            env = {"MLX_RANK": "0", "MLX_HOSTFILE": hostfile}
        self.watchdog = groups.Watchdog(self.children, config.tp_timeout_s)
        self.watchdog.start()
        self.stopped = False
        groups.at_exit(self.stop)
        try:
            with self.watchdog.busy(startup=True), _environ(env):
                self.group = groups.join(size, spawned)
        except BaseException:
            self.stop()
            raise
        self.channel = Channel(self.group)

    def shard(self, loaded: LoadedModel) -> None:
        loaded.model.shard(self.group)
        mx.eval(loaded.model.parameters())  # the shards only: the full weights go

    def agree(self, print_: int, num_blocks: int) -> None:
        """Every rank loaded the same model with the same options; tell them the pool."""
        with self.watchdog.busy(startup=True):
            prints = self.channel.gather([print_])
            differ = [rank for rank, (p,) in enumerate(prints) if p != print_]
            self.channel.broadcast([0 if differ else num_blocks])
        if differ:
            raise TensorParallelError(
                f"tensor-parallel rank(s) {differ} loaded a different model, options or "
                "version than rank 0: start every rank with the same model, the same "
                "options and the same nanovllm-mlx and MLX versions"
            )

    def abort(self) -> None:
        """End the spawned ranks after a start-up error on rank 0 (a size that does not
        divide the heads, say), which the caller then reports in one line. No STOP: the
        others may be anywhere but in a collective. MLX's transport writes a line per
        closed socket to this process's stderr as they die; those go to /dev/null."""
        self.stopped = True
        self.watchdog.stopping = True
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
                groups.kill(self.children)
                time.sleep(0.3)  # the transport's threads notice the closed sockets
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def failed(self, error: Exception) -> TensorParallelError:
        """The error to end the run with: which rank died and how, when a spawned one did
        (the transport notices first; the watchdog knows which)."""
        watchdog = self.watchdog
        if watchdog.ending:
            time.sleep(10)  # the watchdog is ending the process with its own error line
        if watchdog.dead is None:
            for child in self.children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=1.0)
                    break
            watchdog.check_children()
        if watchdog.dead is None:
            watchdog.dead = f"a tensor-parallel rank is gone: {error}"
        return TensorParallelError(watchdog.dead)

    def wrap(self, runner: ModelRunner) -> ParallelRunner:
        return ParallelRunner(runner, self)

    def stop(self) -> None:
        """Tell the other ranks to exit, and make sure the spawned ones do."""
        if self.stopped:
            return
        self.stopped = True
        self.watchdog.stopping = True
        channel = getattr(self, "channel", None)
        if channel is not None and self.watchdog.dead is None:
            try:
                channel.broadcast(encode(Record(STOP)))
            except TensorParallelError:
                pass
        for child in self.children:
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        groups.kill(self.children)


_started = False
T = TypeVar("T")


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """MLX reads its rank and hostfile from the environment; set them only for as long as
    it reads them, so that nothing this process starts later inherits them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ParallelRunner:
    """A ModelRunner whose every step first tells the other ranks what to compute."""

    def __init__(self, runner: ModelRunner, tp: TensorParallel):
        self.runner = runner
        self.tp = tp
        self.sender = Sender()

    def run(
        self, batch: list[ScheduledSeq], look_ahead: bool = False
    ) -> tuple[list[int], list[RowSample | None] | None]:
        # No look-ahead: a step launched ahead would need this step's tokens on every
        # rank before rank 0 has read them.
        return self._together(self.sender.record(batch), lambda: self.runner.run(batch, False))

    def all_logits(self, item: ScheduledSeq) -> mx.array:
        return self._together(self.sender.record([item]), lambda: self.runner.all_logits(item))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self._together(Record(COPY, copies=pairs), lambda: self.runner.copy_blocks(pairs))

    def copy_states(self, pairs: list[tuple[int, int]]) -> None:
        # Models with recurrent state refuse tensor parallelism when sharded (their
        # shard() raises), so no plan of theirs reaches a group.
        raise TensorParallelError("recurrent-state models do not run tensor-parallel")

    def _together(self, record: Record, run: Callable[[], T]) -> T:
        """Tell the other ranks, then do the same here: a rank that is gone is the run's
        end, not a request's."""
        try:
            with self.tp.watchdog.busy():
                self.tp.channel.broadcast(encode(record))
                result = run()
                if record.kind == COPY:
                    mx.eval(self.runner.cache_arrays())
                return result
        except TensorParallelError as e:
            raise self.tp.failed(e) from None
        except RuntimeError as e:
            if "[ring]" in str(e) or "nccl" in str(e).lower():
                raise self.tp.failed(e) from None
            raise

    # What the engine reads of a runner besides the step (engine/runner/protocol.py): the
    # wrapped runner's, named one by one so that the type checker sees them.
    @property
    def pool(self) -> PoolLayout:
        return self.runner.pool

    @property
    def steps_ahead_used(self) -> int:
        return self.runner.steps_ahead_used

    @property
    def steps_ahead_dropped(self) -> int:
        return self.runner.steps_ahead_dropped

    @property
    def decode_buckets(self) -> set[tuple[Any, ...]]:
        return self.runner.decode_buckets

    @property
    def compile_decode(self) -> bool:
        return self.runner.compile_decode
