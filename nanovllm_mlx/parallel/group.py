"""Starting the ranks of a tensor-parallel engine, and noticing when one fails.

Two ways to start, one code path after: under `mlx.launch` (a hostfile of several Macs, or
NCCL on a multi-GPU host) every process runs the user's command and MLX_RANK says which
rank it is; without it, rank 0 spawns ranks 1..N-1 itself on this host, each a
`python -m nanovllm_mlx.parallel.worker` process, on free loopback ports of MLX's ring
backend. Either way rank 0 then watches the others: a spawned rank that exits, or a step
that waits on the others longer than the timeout, ends the run with one error line
rather than a hang (a live rank that skips a collective blocks the others forever).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from nanovllm_mlx import backend
from nanovllm_mlx.errors import TensorParallelError

POLL_S = 0.2


def launched_rank() -> int | None:
    """This process's rank when mlx.launch (or our spawner) started it; None otherwise."""
    rank = os.environ.get("MLX_RANK")
    return None if rank is None else int(rank)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Child:
    rank: int
    proc: subprocess.Popen
    log: Path  # its stderr: the reason, if it dies

    def last_words(self) -> str:
        try:
            lines = [line for line in self.log.read_text().splitlines() if line.strip()]
        except OSError:
            return ""
        errors = [line for line in lines if line.startswith("error:")]
        return errors[-1].removeprefix("error: ") if errors else ""


@dataclass
class Watchdog:
    """Rank 0's guard: exits the process with one error line when a spawned rank dies
    while the others wait on it, or a step waits longer than `timeout_s`."""

    children: list[Child]
    timeout_s: float
    busy_since: float | None = None
    timed: bool = True  # False during start-up: loading a model may take minutes
    stopping: bool = False
    ending: bool = False  # the watchdog is ending the process
    dead: str | None = None  # why a rank is gone, once one is
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="nanovllm-tp-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def busy(self, startup: bool = False) -> Iterator[None]:
        """Around anything that waits on the other ranks. During start-up only a rank's
        death ends the run (it may be loading a large model), not the timeout."""
        if self.dead is not None:
            raise TensorParallelError(self.dead)
        self.timed = not startup
        self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None

    def check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None and not self.stopping and self.dead is None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                why = child.last_words()
                self.dead = f"tensor-parallel rank {child.rank} {how}" + (f": {why}" if why else "")

    def _watch(self) -> None:
        while not self.stopping:
            time.sleep(POLL_S)
            self.check_children()
            since = self.busy_since
            if since is not None and self.dead is not None:
                self._fail(self.dead)  # a collective waits on a rank that is gone
            elif self.timed and since is not None and time.monotonic() - since > self.timeout_s:
                self._fail(
                    f"tensor-parallel ranks stopped answering: a step waited {self.timeout_s:.0f}"
                    " s on them (a rank is stuck or was paused)"
                )

    def _fail(self, message: str) -> None:
        # The main thread is blocked inside a collective that can never complete: nothing
        # but ending the process releases it. Killing the ranks unblocks it; `ending` keeps
        # it from reporting anything of its own meanwhile (ParallelRunner.failed waits).
        self.ending = True
        self.dead = message
        kill(self.children)
        time.sleep(0.5)  # the transport's own lines about the closed sockets come first
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(1)


def kill(children: list[Child]) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=5)


def spawn(size: int, model: str | None, options: dict) -> tuple[list[Child], str]:
    """Ranks 1..size-1 of a local group; returns them and the hostfile rank 0 joins with.

    The ranks share this machine's cores: on a CPU each rank's BLAS gets its share of
    them (unless OPENBLAS_NUM_THREADS or MKL_NUM_THREADS is set). On 2 cores, GPT-2 small
    shape, 8 requests: -tp 2 ran at 15.8 tok/s with every rank's BLAS on both cores (two
    sets of spinning threads), 53.0 with one thread a rank; -tp 1 ran at 45.3."""
    threads = {}
    if not any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
        each = backend.cpus_each(size)
        backend.set_blas_threads(each)  # rank 0, this process: its BLAS is loaded already
        threads = {"OPENBLAS_NUM_THREADS": str(each), "MKL_NUM_THREADS": str(each)}
    tmp = Path(tempfile.mkdtemp(prefix="nanovllm-tp-"))
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(size)]))
    spec = json.dumps({"model": model, "options": options})
    children = []
    for rank in range(1, size):
        log = tmp / f"rank{rank}.log"
        env = {
            **os.environ,
            **threads,
            "MLX_RANK": str(rank),
            "MLX_HOSTFILE": str(hostfile),
            "NANOVLLM_TP_PARENT": str(os.getpid()),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanovllm_mlx.parallel.worker", spec],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            start_new_session=True,  # a Ctrl-C reaches rank 0, which stops the others
        )
        children.append(Child(rank, proc, log))
    return children, str(hostfile)


def join(size: int, spawned: bool) -> mx.distributed.Group:
    """Initialise MLX's distributed group of this process and check its size."""
    try:
        group = mx.distributed.init(strict=True, backend="ring" if spawned else "any")
    except RuntimeError as e:
        raise TensorParallelError(f"could not start the tensor-parallel group: {e}") from None
    if group.size() != size:
        raise TensorParallelError(
            f"tensor_parallel_size is {size} but this process was launched in a group of "
            f"{group.size()}: launch as many processes as tensor_parallel_size"
        )
    return group


def watch_parent() -> None:
    """A spawned rank whose rank 0 is gone exits rather than linger (rank 0 was killed
    before it could stop it)."""
    parent = os.environ.get("NANOVLLM_TP_PARENT")
    if parent is None:
        return

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != int(parent):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="nanovllm-tp-parent", daemon=True).start()


def at_exit(stop: object) -> None:
    atexit.register(stop)
