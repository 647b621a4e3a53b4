"""One thread that owns an LLMEngine, driven from asyncio.

The engine is not thread-safe, and MLX streams are thread-local (MLX >= 0.31.2), so one
thread builds the engine and runs its add_request/step loop. The asyncio side never
touches the engine: it posts commands (closures) that the thread runs between steps, and
each request's outputs come back through `loop.call_soon_threadsafe` onto its own
asyncio.Queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from nanovllm_mlx.engine.llm_engine import LLMEngine, RequestOutput
from nanovllm_mlx.sampling_params import SamplingParams

logger = logging.getLogger("nanovllm_mlx.serving.engine_thread")

T = TypeVar("T")
_Deliveries = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]]


class EngineError(RuntimeError):
    """The engine failed a request (500), or is not running (503)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _resolve(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Stream:
    """Where one request's outputs go: a queue on the loop that submitted it."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | EngineError] = asyncio.Queue()


class EngineThread:
    """Runs pending commands, then one engine step; sleeps on a condition variable when
    there is neither, so an idle server costs no CPU."""

    def __init__(
        self,
        engine: LLMEngine | None = None,
        build: Callable[[], LLMEngine] | None = None,
    ):
        if (engine is None) == (build is None):
            raise ValueError("give an engine or a function that builds one")
        self.engine = engine
        self._build = build
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self.step_failures = 0  # written by the engine thread only

    # Lifecycle ---------------------------------------------------------------------

    def start(self) -> LLMEngine:
        """Start the thread (if not running) and wait until the engine is built; a load
        error is raised here, in the caller's thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._ready.clear()
            self._thread = threading.Thread(target=self._main, name="nanovllm-engine", daemon=True)
            self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error
        assert self.engine is not None
        return self.engine

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail whatever is in flight (503) and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # Called from the asyncio side ----------------------------------------------------

    def _post(self, command: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise EngineError("the engine is not running", status=503)
            self._commands.append(command)
            self._cond.notify()

    async def submit(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> asyncio.Queue[RequestOutput | EngineError]:
        """Add a request; returns its output queue once the engine has accepted it.

        add_request runs in the engine thread and its ValueError (a bad prompt) is raised
        here, so a bad request never reaches the running batch. The queue yields
        RequestOutputs until one is finished, or an EngineError.
        """
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        accepted: asyncio.Future[None] = loop.create_future()

        def add() -> None:
            assert self.engine is not None
            try:
                self.engine.add_request(prompt, params, request_id)
            except Exception as e:
                loop.call_soon_threadsafe(_resolve, accepted, None, e)
                return
            self._streams[request_id] = stream
            loop.call_soon_threadsafe(_resolve, accepted, None, None)

        self._post(add)
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream.queue

    def abort(self, request_id: str) -> None:
        """Drop a request and free its blocks; a no-op once it has finished."""

        def abort() -> None:
            assert self.engine is not None
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        try:
            self._post(abort)
        except EngineError:
            pass  # stopping: everything in flight is being failed anyway

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine), run in the engine thread between steps."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            assert self.engine is not None
            try:
                result, error = fn(self.engine), None
            except Exception as e:
                result, error = None, e
            loop.call_soon_threadsafe(_resolve, future, result, error)

        self._post(run)
        return await future

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
        self._ready.set()
        while self._wait_for_work():
            try:
                self._run_steps()
            except Exception as e:
                # A bug in this loop: never leave requests waiting on a dead thread.
                logger.exception("engine thread error")
                self._fail_all(EngineError(f"engine error: {e!r}"))
        self._fail_all(EngineError("the server is shutting down", status=503))

    def _wait_for_work(self) -> bool:
        """Sleep until there is a command or a request; run the commands. False: stop."""
        engine = self.engine
        assert engine is not None
        with self._cond:
            while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                self._cond.wait()
        return self._run_commands()

    def _run_commands(self) -> bool:
        with self._cond:
            commands, self._commands = self._commands, []
            stopping = self._stopping
        for command in commands:
            try:
                command()
            except Exception:
                logger.exception("engine command failed")
        return not stopping

    def _run_steps(self) -> None:
        """Steps until the engine is idle, running commands between steps."""
        engine = self.engine
        assert engine is not None
        steps = engine.iterate()
        try:
            for outputs in steps:
                self._deliver(self._route(outputs))
                if not self._run_commands():
                    return
        except Exception as e:
            self.step_failures += 1
            logger.exception("engine step failed; failing %d request(s)", len(self._streams))
            self._fail_all(EngineError(f"engine step failed: {e!r}"))
        finally:
            steps.close()

    def _route(self, outputs: list[RequestOutput]) -> _Deliveries:
        deliveries: _Deliveries = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            deliveries.setdefault(stream.loop, []).append((stream.queue, out))
        return deliveries

    def _fail_all(self, error: EngineError) -> None:
        engine = self.engine
        deliveries: _Deliveries = {}
        for request_id, stream in self._streams.items():
            try:
                if engine is not None:
                    engine.abort_request(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            deliveries.setdefault(stream.loop, []).append((stream.queue, error))
        self._streams.clear()
        self._deliver(deliveries)
        if engine is not None and engine.has_unfinished_requests():
            logger.error("the engine still holds requests after all were failed")

    @staticmethod
    def _deliver(deliveries: _Deliveries) -> None:
        # One wake-up of the loop per step, however many requests got a token.
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass
