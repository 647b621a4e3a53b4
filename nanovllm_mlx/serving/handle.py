"""One request's life on the asyncio side: hand it to the engine thread, watch its client
and its deadline, and stream or collect its outputs.

From the moment it is handed over, a watcher task waits for the client to disconnect (or
the request timeout to pass) and then aborts the request wherever it is: still handed over
(it is never added), waiting in the engine, or running. Every request ends exactly once,
and is counted once, by finish reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from nanovllm_mlx.engine.llm_engine import RequestOutput
from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.sampling_params import SamplingParams
from nanovllm_mlx.serving.engine_thread import EngineThread
from nanovllm_mlx.serving.errors import APIError, ClientGone, bad_request, invalid_request
from nanovllm_mlx.serving.metrics import ServingMetrics
from nanovllm_mlx.serving.settings import RETRY_AFTER_S
from nanovllm_mlx.serving.streaming import EventStream, Renderer, sse_events
from nanovllm_mlx.serving.ticket import EngineError, QueueFull, Ticket, TooWide


class _End:
    """Put on a request's queue by the asyncio side when it ends the request itself."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class RequestHandle:
    def __init__(
        self,
        engine_thread: EngineThread,
        metrics: ServingMetrics,
        request: Request,
        request_id: str,
        timeout: float | None,
        num_prompts: int = 1,
    ):
        self.engine_thread = engine_thread
        self.metrics = metrics
        self.request = request
        self.request_id = request_id
        # One engine request per prompt; a single prompt's is the request's own id.
        self.engine_ids = (
            [request_id] if num_prompts == 1 else [f"{request_id}-{i}" for i in range(num_prompts)]
        )
        self.arrival: float = getattr(request.state, "arrival", time.perf_counter())
        self.timeout = timeout
        self.ticket: Ticket | None = None
        self.done = False
        self._watcher: asyncio.Task[None] | None = None
        self._last_token: float | None = None

    async def start(
        self, prompts: list[list[int]], params: SamplingParams, renames: dict[str, str]
    ) -> None:
        """Hand the request over and wait until the engine has taken it. Raises the
        engine's refusal as a 400 (parameters named as the endpoint names them), a 503,
        a 504 on timeout, or ClientGone."""
        self.ticket = ticket = Ticket(self.request_id, prompts, params, self.engine_ids)
        try:
            self.engine_thread.submit(ticket)
        except TooWide as e:
            self.done = True
            raise bad_request(str(e), e.param) from None
        except QueueFull as e:
            raise APIError(
                503, str(e), code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}
            ) from None
        except EngineError as e:
            raise APIError(e.status, str(e)) from None
        self._watcher = asyncio.create_task(self._watch())
        try:
            await ticket.accepted
        except InvalidRequestError as e:
            self.done = True  # never added: nothing to abort or count
            self._stop_watching()
            error = invalid_request(e, renames)
            if e.index is not None and len(prompts) > 1:
                error.message = f"prompt {e.index}: {error.message}"
            raise error from None
        except EngineError as e:  # the server is shutting down
            self._end("error")
            raise APIError(e.status, str(e)) from None
        except BaseException:
            self.close()
            raise
        self.request.state.accepted = True

    async def batches(self) -> AsyncIterator[list[RequestOutput]]:
        """Outputs as they come, several per item when the client fell behind the engine.
        Raises APIError when the engine fails the request or it times out, ClientGone when
        the client left."""
        assert self.ticket is not None
        queue = self.ticket.queue
        unfinished = set(self.engine_ids)
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            outputs: list[RequestOutput] = []
            for item in items:
                if isinstance(item, _End):
                    raise item.error
                if isinstance(item, EngineError):
                    self._end("error")
                    raise APIError(item.status, str(item))
                if item.finished and item.finish_reason == "error":
                    self._end("error")  # and its other prompts, if any, are aborted
                    # The engine ended this request alone; the rest of the batch goes on.
                    message = getattr(item, "error", None) or "the engine failed this request"
                    raise APIError(500, message, code="engine_error")
                if item.request_finished:
                    unfinished.discard(item.request_id)
                outputs.append(item)
            self._observe_tokens(outputs)
            if outputs and not unfinished:
                self._end(
                    outputs[-1].finish_reason or "stop"
                )  # before the yield: it may not resume
            yield outputs
            if not unfinished:
                return

    async def collect(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        async for batch in self.batches():
            outputs += batch
        return outputs

    def close(self) -> None:
        """The response is over, however it ended: abort the request if it still runs."""
        self._end("abort", ClientGone())

    # Internals -------------------------------------------------------------------------

    async def _watch(self) -> None:
        remaining = None
        if self.timeout is not None:
            remaining = max(0.0, self.arrival + self.timeout - time.perf_counter())
        try:
            await asyncio.wait_for(_wait_disconnect(self.request), remaining)
        except asyncio.TimeoutError:
            message = f"the request timed out after {self.timeout:g} s (--request-timeout)"
            self._end("timeout", APIError(504, message, code="request_timeout"))
            return
        self._end("abort", ClientGone())

    def _end(self, reason: str, error: Exception | None = None) -> None:
        """End the request once: abort it in the engine unless it finished there, wake
        whoever waits on it with `error`, and count it."""
        if self.done:
            return
        self.done = True
        self._stop_watching()
        self.metrics.finished.labels(reason).inc()
        if reason in ("stop", "length"):
            self.metrics.latency.observe(time.perf_counter() - self.arrival)
            return
        assert self.ticket is not None
        # After an error too: the engine ended the failed prompt's request alone, and the
        # request's other prompts must not run on (a no-op for what has finished).
        self.engine_thread.abort(self.request_id)
        if error is not None:
            if not self.ticket.accepted.done():
                self.ticket.accepted.set_exception(error)
            self.ticket.queue.put_nowait(_End(error))

    def _stop_watching(self) -> None:
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()

    def _observe_tokens(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        tokens = sum(len(o.token_ids) for o in outputs)
        if not tokens:
            return
        if self._last_token is None:
            self.metrics.ttft.observe(now - self.arrival)
            tokens -= 1
        elif tokens:
            # Tokens that arrived together are spread over the gap they arrived after.
            gap = (now - self._last_token) / tokens
            for _ in range(tokens):
                self.metrics.itl.observe(gap)
        self._last_token = now


async def answer(
    handle: RequestHandle,
    prompts: list[list[int]],
    params: SamplingParams,
    renderer: Renderer,
    *,
    stream: bool,
    include_usage: bool,
    renames: dict[str, str],
) -> Response:
    """Run the request and answer it: server-sent events, or one JSON body."""
    await handle.start(prompts, params, renames)
    if stream:
        return EventStream(sse_events(handle.batches(), renderer, include_usage), handle.close)
    try:
        outputs = await handle.collect()
    finally:
        handle.close()
    return Response(renderer.response(outputs).model_dump_json(), media_type="application/json")
