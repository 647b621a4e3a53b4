"""One thread that owns an LLMEngine, driven from asyncio.

The engine is not thread-safe, and MLX streams are thread-local (MLX >= 0.31.2), so one
thread builds the engine and runs its step loop. The asyncio side never touches the engine:
it hands requests over (a Ticket each), asks for aborts, and reads the snapshot the thread
publishes; a request's outputs come back through `loop.call_soon_threadsafe` onto its own
asyncio.Queue.

At each step boundary the thread first applies the aborts asked for since the last one,
then adds the requests handed over meanwhile. A request abandoned before its boundary is
dropped from the hand-over queue, so the engine never sees it; one abandoned later is
aborted before the next step.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from nanovllm_mlx.engine.llm_engine import LLMEngine, RequestOutput
from nanovllm_mlx.errors import TensorParallelError
from nanovllm_mlx.serving.snapshot import EngineSnapshot
from nanovllm_mlx.serving.ticket import (
    EngineError,
    QueueFull,
    Ticket,
    TooWide,
    on_loops,
    put,
    settle,
)

logger = logging.getLogger("nanovllm_mlx.serving.engine_thread")

# Readers (/health, /metrics, the live view) need no more than 20 snapshots a second, and a
# GPU step is a few ms: refreshed at most this often while busy (and always when idle).
PUBLISH_EVERY_S = 0.05


def _wait_os_thread_exit(thread: threading.Thread, timeout: float = 1.0) -> None:
    # join() returns before the OS thread has run its thread-local destructors. MLX's (of
    # mx.random.seed, which the engine calls) abort the process ("terminate called without
    # an active exception") if it exits meanwhile: wait until the thread is really gone.
    tid = thread.native_id
    if tid is None or not sys.platform.startswith("linux"):
        time.sleep(0.05)
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(0.001)


class EngineThread:
    """Steps the engine while it has work, applying hand-overs and aborts between steps;
    sleeps on a condition variable otherwise, so an idle server costs no CPU."""

    def __init__(
        self,
        engine: LLMEngine | None = None,
        build: Callable[[], LLMEngine] | None = None,
        max_waiting: int | None = None,
    ):
        if (engine is None) == (build is None):
            raise ValueError("give an engine or a function that builds one")
        self.engine = engine
        self.max_waiting = max_waiting
        self._build = build
        self._cond = threading.Condition()
        self._pending: dict[str, Ticket] = {}  # handed over, not yet added
        self._aborts: set[str] = set()
        self._adding = 0  # sequences of the tickets taken from _pending, being added
        self._engine_waiting = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        # Engine thread only: live tickets by their id, and by their engine requests' ids.
        self._tickets: dict[str, Ticket] = {}
        self._live: dict[str, Ticket] = {}
        self._steps: Iterator[list[RequestOutput]] | None = None
        self._published = 0.0
        self.step_failures = 0
        self.fatal: str | None = None  # why the engine can never step again, if it cannot
        self.on_fatal: Callable[[], None] | None = None  # ends the server (serving/app.serve)
        self._finished = 0
        self._failed = 0
        self._snapshot: EngineSnapshot | None = None

    # Lifecycle ---------------------------------------------------------------------

    def start(self) -> LLMEngine:
        """Start the thread (if not running) and wait until the engine is built; a load
        error is raised here, in the caller's thread, once the engine thread is gone."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._ready.clear()
            self._thread = threading.Thread(target=self._main, name="nanovllm-engine", daemon=True)
            self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            self._thread.join()
            _wait_os_thread_exit(self._thread)
            raise self._build_error
        assert self.engine is not None
        return self.engine

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail whatever is in flight (503) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
            _wait_os_thread_exit(self._thread)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # Called from the asyncio side ----------------------------------------------------

    def queued(self) -> int:
        """Sequences waiting for admission to the running batch, every choice of every
        prompt counted (what max_waiting bounds)."""
        pending = sum(t.width for t in list(self._pending.values()))
        return pending + self._adding + self._engine_waiting

    def full(self) -> bool:
        return self.max_waiting is not None and self.queued() >= self.max_waiting

    def submit(self, ticket: Ticket) -> None:
        """Hand a request over; ticket.accepted resolves once the engine has taken it (or
        with the engine's refusal). The one admission decision: raises TooWide for a
        request the queue could never hold, QueueFull while it is full (the guard asks
        full() too, to refuse before reading a body), EngineError when not running."""
        limit = self.max_waiting
        if limit is not None and ticket.width > limit:
            raise TooWide(len(ticket.prompts), ticket.params.num_sequences, limit)
        with self._cond:
            if not self.alive:
                raise EngineError("the engine is not running", status=503)
            if self.full():
                assert self.max_waiting is not None
                raise QueueFull(self.max_waiting)
            self._pending[ticket.request_id] = ticket
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request: never added if still handed over, else aborted (its blocks
        freed) at the next step boundary; a no-op once it has finished."""
        with self._cond:
            if self._pending.pop(request_id, None) is None:
                self._aborts.add(request_id)
                self._cond.notify()

    def snapshot(self) -> EngineSnapshot:
        snap = self._snapshot
        assert snap is not None, "the engine thread has not started"
        return replace(snap, alive=self.alive, waiting=self.queued())

    # The thread ----------------------------------------------------------------------

    def _main(self) -> None:
        if self.engine is None:
            try:
                assert self._build is not None
                self.engine = self._build()
            except BaseException as e:
                self._build_error = e
                self._ready.set()
                return
        self._publish()
        self._ready.set()
        try:
            while True:
                try:
                    if not self._boundary():
                        return
                    if self.engine.has_unfinished_requests():
                        self._step()
                    self._publish(force=not self.engine.has_unfinished_requests())
                except Exception as e:
                    # A bug in this loop: never leave requests waiting on a dead thread.
                    logger.exception("engine thread error")
                    self._fail_all(EngineError(f"engine error: {e!r}"))
        finally:
            self._fail_all(EngineError("the server is shutting down", status=503))
            self._steps = None
            self._publish()

    def _boundary(self) -> bool:
        """Wait for work, then apply aborts and add what was handed over. False: stop."""
        engine = self.engine
        assert engine is not None
        with self._cond:
            while not (
                self._pending or self._aborts or self._stopping or engine.has_unfinished_requests()
            ):
                self._cond.wait()
            if self._stopping:
                return False
            aborts, self._aborts = self._aborts, set()
            adds = list(self._pending.values())
            self._pending.clear()
            self._adding = sum(t.width for t in adds)
        for request_id in aborts:
            ticket = self._tickets.pop(request_id, None)
            if ticket is not None and ticket.failed:  # one prompt failed: the rest is dropped
                self._finished += 1
                self._failed += 1
            for engine_id in [] if ticket is None else ticket.engine_ids:
                self._live.pop(engine_id, None)
                engine.abort_request(engine_id)  # every choice of it
        settled: list[tuple[Ticket, BaseException | None]] = []
        for ticket in adds:
            try:
                params = [ticket.params] * len(ticket.prompts)
                engine.add_requests(ticket.prompts, params, ticket.engine_ids)
            except Exception as e:  # the engine's verdict on the request: the client's 400
                settled.append((ticket, e))
                continue
            self._tickets[ticket.request_id] = ticket
            for engine_id in ticket.engine_ids:
                self._live[engine_id] = ticket
            settled.append((ticket, None))
        with self._cond:
            self._adding = 0
            self._engine_waiting = engine.num_waiting()
        on_loops(settle, settled)
        return True

    def _step(self) -> None:
        engine = self.engine
        assert engine is not None
        if self._steps is None:
            self._steps = engine.iterate()
        try:
            outputs = next(self._steps)
        except StopIteration:
            self._steps = None
            return
        except TensorParallelError as e:
            # A rank is gone: no step can run again. Fail what is in flight, stop being
            # healthy, and end the server (its caller reports `fatal`).
            self._steps = None
            self.fatal = str(e)
            logger.error("%s; stopping the server", e)
            self._fail_all(EngineError(f"the engine stopped: {e}", status=503))
            with self._cond:
                self._stopping = True
            if self.on_fatal is not None:
                self.on_fatal()
            return
        except Exception as e:
            self._steps = None
            self.step_failures += 1
            logger.exception("engine step failed; failing %d request(s)", len(self._live))
            self._fail_all(EngineError(f"engine step failed: {e!r}"))
            return
        delivered: list[tuple[Ticket, RequestOutput | EngineError]] = []
        for out in outputs:
            ticket = self._live.get(out.request_id)
            if ticket is None:
                continue
            ticket.failed |= out.finished and out.finish_reason == "error"
            if out.request_finished:
                del self._live[out.request_id]
                ticket.unfinished -= 1
                if not ticket.unfinished:
                    self._tickets.pop(ticket.request_id, None)
                    self._finished += 1
                    self._failed += ticket.failed
            delivered.append((ticket, out))
        self._engine_waiting = engine.num_waiting()
        on_loops(put, delivered)

    def _fail_all(self, error: EngineError) -> None:
        engine = self.engine
        failed: list[tuple[Ticket, RequestOutput | EngineError]] = []
        for ticket in self._tickets.values():
            for engine_id in ticket.engine_ids:
                try:
                    if engine is not None:
                        engine.abort_request(engine_id)
                except Exception:
                    logger.exception("abort of %s failed", engine_id)
            failed.append((ticket, error))
        self._failed += len(failed)
        self._tickets.clear()
        self._live.clear()
        on_loops(put, failed)
        if error.status == 503:  # shutting down: refuse what was never added too
            with self._cond:
                never_added, self._pending = list(self._pending.values()), {}
            on_loops(settle, [(t, error) for t in never_added])
        if engine is not None and engine.has_unfinished_requests():
            logger.error("the engine still holds requests after all were failed")

    def _publish(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_EVERY_S:
            return
        self._published = now
        assert self.engine is not None
        self._snapshot = EngineSnapshot.of(
            self.engine.stats(),
            time=now,
            alive=self.alive,
            step_failures=self.step_failures,
            requests_finished=self._finished,
            requests_failed=self._failed,
        )
