"""Server-sent events for both generation endpoints: one event loop and one response class;
what differs between /v1/completions and /v1/chat/completions is the Renderer."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nanovllm_mlx.engine.llm_engine import RequestOutput
from nanovllm_mlx.serving.errors import APIError, ClientGone
from nanovllm_mlx.serving.protocol import Usage, usage

DONE = b"data: [DONE]\n\n"


class Renderer(Protocol):
    """An endpoint's response shapes, for one request."""

    def start(self) -> list[BaseModel]:
        """Chunks sent before any output (chat: the assistant role of each choice)."""
        ...

    def deltas(self, batch: list[RequestOutput]) -> list[BaseModel]:
        """Chunks for outputs that arrived together (none when they carry nothing)."""
        ...

    def usage_chunk(self) -> BaseModel:
        """The `stream_options.include_usage` chunk: no choices, the request's usage."""
        ...

    def response(self, outputs: list[RequestOutput]) -> BaseModel:
        """The whole answer of a request that is not streamed."""
        ...


class RendererBase:
    """What both endpoints' renderers know about the request they answer: its choices
    (index = prompt index * n + choice, as OpenAI numbers them) and its usage."""

    def __init__(
        self,
        request_id: str,
        model: str,
        token_text: Callable[[int], str],
        logprobs: bool,
        engine_ids: list[str],
        n: int,
    ):
        self.answer = {"id": request_id, "created": int(time.time()), "model": model}
        self.token_text = token_text
        self.logprobs = logprobs
        self.n = n
        self.prompt_index = {engine_id: i for i, engine_id in enumerate(engine_ids)}
        self._prompts: dict[str, tuple[int, int]] = {}  # engine id -> prompt, cached tokens
        self._completions: dict[int, int] = {}  # choice -> its output tokens so far

    def by_choice(self, outputs: list[RequestOutput]) -> dict[int, list[RequestOutput]]:
        """Outputs grouped by choice index, in index order; usage noted on the way."""
        groups: dict[int, list[RequestOutput]] = {}
        for out in outputs:
            index = self.prompt_index[out.request_id] * self.n + out.index
            self._prompts[out.request_id] = (out.num_prompt_tokens, out.num_cached_tokens)
            self._completions[index] = max(self._completions.get(index, 0), out.num_output_tokens)
            groups.setdefault(index, []).append(out)
        return dict(sorted(groups.items()))

    def usage(self) -> Usage:
        """OpenAI's: each prompt counted once, every choice's tokens summed."""
        prompts = self._prompts.values()
        return usage(
            sum(p for p, _ in prompts), sum(self._completions.values()), sum(c for _, c in prompts)
        )


def _event(chunk: BaseModel, include_usage: bool) -> bytes:
    # With include_usage every chunk carries "usage" (null until the last), as OpenAI does.
    data = chunk.model_dump_json(exclude=None if include_usage else {"usage"})
    return b"data: " + data.encode() + b"\n\n"


async def sse_events(
    batches: AsyncIterator[list[RequestOutput]], renderer: Renderer, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """A request's events. A failure after the response has started (the engine failed the
    request, or it timed out) is one error event, then [DONE], as OpenAI streams do."""
    seen = False
    try:
        for chunk in renderer.start():
            yield _event(chunk, include_usage)
        async for batch in batches:
            seen = seen or bool(batch)
            for chunk in renderer.deltas(batch):
                yield _event(chunk, include_usage)
        if include_usage and seen:
            yield _event(renderer.usage_chunk(), True)
    except APIError as e:
        yield _event(e.body(), False)
    except ClientGone:
        return
    yield DONE


class EventStream(StreamingResponse):
    """text/event-stream whose request ends (on_close) however the response ends. It does
    not read the client's messages: the request's own watcher sees a disconnect, aborts
    the request, and that ends the events."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            pass
        finally:
            self.on_close()
            await self.events.aclose()
