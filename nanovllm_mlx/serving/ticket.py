"""A request handed from an event loop to the engine thread, and how the thread answers it:
always on the request's own loop, in one wake-up per loop however many requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from nanovllm_mlx.engine.llm_engine import RequestOutput
from nanovllm_mlx.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm_mlx.serving.engine_thread import EngineError


class Ticket:
    """One request handed to the engine thread; made on (and answered to) its event loop."""

    __slots__ = ("request_id", "prompt", "params", "loop", "queue", "accepted")

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.loop = asyncio.get_running_loop()
        # RequestOutputs until one is finished, or one EngineError.
        self.queue: asyncio.Queue[RequestOutput | EngineError] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = self.loop.create_future()


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
