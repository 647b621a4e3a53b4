"""A request handed from an event loop to the engine thread, and how the thread answers it
(outputs, or an EngineError): always on the request's own loop, in one wake-up per loop
however many requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nanovllm_mlx.engine.llm_engine import RequestOutput
from nanovllm_mlx.sampling_params import SamplingParams


class EngineError(RuntimeError):
    """The engine failed a request (500), or is not running or too busy (503)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class QueueFull(EngineError):
    def __init__(self, limit: int):
        super().__init__(
            f"the server is at capacity: {limit} requests are already waiting; retry later", 503
        )


class TooWide(EngineError):
    """A request of more sequences than the queue holds: it could never be queued whole,
    so it is the request's fault (400), not the server's load."""

    def __init__(self, num_prompts: int, num_sequences: int, limit: int):
        width = num_prompts * num_sequences
        super().__init__(
            f"{num_prompts} prompt(s) x {num_sequences} choice(s) = {width} sequences, more "
            f"than this server queues at once ({limit}, --max-waiting)",
            400,
        )
        self.param = "n" if num_prompts == 1 else "prompt"


class Ticket:
    """One request handed to the engine thread; made on (and answered to) its event loop.
    It may hold several prompts: each is an engine request of its own (engine_ids), all
    added together or none."""

    __slots__ = (
        "request_id",
        "prompts",
        "params",
        "engine_ids",
        "unfinished",
        "failed",
        "loop",
        "queue",
        "accepted",
    )

    def __init__(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        engine_ids: list[str],
    ):
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.engine_ids = engine_ids
        # Engine thread only: engine requests not finished, and whether one failed.
        self.unfinished = len(engine_ids)
        self.failed = False
        self.loop = asyncio.get_running_loop()
        # RequestOutputs until one is finished, or one EngineError.
        self.queue: asyncio.Queue[RequestOutput | EngineError] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = self.loop.create_future()

    @property
    def width(self) -> int:
        """Sequences it queues: every choice of every prompt (admission control)."""
        return len(self.prompts) * self.params.num_sequences


def settle(items: list[tuple[Ticket, BaseException | None]]) -> None:
    for ticket, error in items:
        if ticket.accepted.done():  # abandoned meanwhile
            continue
        if error is None:
            ticket.accepted.set_result(None)
        else:
            ticket.accepted.set_exception(error)


def put(items: list[tuple[Ticket, RequestOutput | EngineError]]) -> None:
    for ticket, item in items:
        ticket.queue.put_nowait(item)


def on_loops(fn: Callable[[list], None], items: list[tuple[Ticket, object]]) -> None:
    """fn(items) on each items' event loop: one wake-up per loop, however many items."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for item in items:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(fn, batch)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass
