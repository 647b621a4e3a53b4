"""HTTP hardening in front of every route: Host allowlist, API key, JSON content type, body
size, and admission when the waiting queue is full; plus JSON bodies parsed off the event
loop.

The body limit is checked on Content-Length before anything is read, and counted while a
chunked body is read. (FastAPI's own `max_body_size` answers a declared oversized body with
a plain-text 413 that replaces any JSON one, so it is not used.)
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanovllm_mlx.serving.errors import APIError
from nanovllm_mlx.serving.settings import RETRY_AFTER_S, ServerSettings, normalize_host

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers' probes)


class Guard:
    """Pure ASGI middleware (no buffering, so streaming is untouched) that answers what no
    route should see: a foreign Host (421), a missing key (401), a POST that is not JSON
    (415: a cross-origin text/plain POST from a web page is never served), and new
    generation requests while the waiting queue is full (503, cheaply, before the body is
    read), and bodies over the size limit (413). It also stamps each request's arrival."""

    def __init__(
        self,
        app: ASGIApp,
        settings: ServerSettings,
        queue_full: Callable[[], bool],
        on_reject: Callable[[int], None],
    ):
        self.app = app
        self.settings = settings
        self.queue_full = queue_full
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrival"] = time.perf_counter()
        error = self.check(scope, Headers(scope=scope))
        if error is None:
            await self.app(scope, self._limited(receive), send)
            return
        self.on_reject(error.status)
        await error.response()(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        limit, seen = self.settings.max_body_bytes, 0

        async def receive_at_most() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised into the route's body read; the app's handler answers it.
                    raise HTTPException(413, _too_large(limit))
            return message

        return receive_at_most

    def check(self, scope: Scope, headers: Headers) -> APIError | None:
        settings, path = self.settings, scope["path"]
        allowed = settings.allowed_hosts
        if allowed is not None and normalize_host(headers.get("host", "")) not in allowed:
            return APIError(
                421,
                f"this server does not answer for Host {headers.get('host', '')!r} "
                "(see --allowed-hosts)",
                code="invalid_host",
            )
        if settings.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), settings.api_key.encode()
            ):
                return APIError(
                    401,
                    "missing or incorrect API key: send `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                )
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                return APIError(
                    415,
                    "send the body as JSON with `Content-Type: application/json`",
                    code="unsupported_media_type",
                )
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > settings.max_body_bytes:
                return APIError(413, _too_large(settings.max_body_bytes), code="body_too_large")
            if path in GENERATION_PATHS and self.queue_full():
                return APIError(
                    503,
                    "the server is at capacity: too many requests are waiting; retry later",
                    code="server_overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
        return None


def _too_large(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit:,} bytes (--max-body-mb)"


class _ThreadedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # A body of several MB takes tens of ms to parse: never on the event loop.
            self._json = await run_in_threadpool(json.loads, await self.body())
        return self._json


class ThreadedJSONRoute(APIRoute):
    """A route whose JSON body is parsed in a worker thread (FastAPI's documented way to
    customise the Request a route sees); validation into the typed body is FastAPI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_ThreadedJSONRequest(request.scope, request.receive))

        return route
