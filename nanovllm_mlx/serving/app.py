"""OpenAI-compatible HTTP server: FastAPI on uvicorn in front of one engine thread.

Endpoints: /v1/completions and /v1/chat/completions (both with SSE streaming), /v1/models
(and /v1/models/{id}), vLLM's /tokenize and /detokenize, /health, /metrics (Prometheus),
and /docs. Handlers validate on the event loop, tokenize in worker threads and hand
requests to the EngineThread (engine_thread.py), the only code that touches the engine;
concurrent requests therefore share the engine's running batch.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from nanovllm_mlx.engine.llm_engine import LLMEngine
from nanovllm_mlx.serving.chat import create_chat_completion
from nanovllm_mlx.serving.completions import create_completion
from nanovllm_mlx.serving.engine_thread import EngineThread
from nanovllm_mlx.serving.errors import APIError, install_handlers
from nanovllm_mlx.serving.guard import Guard, ThreadedJSONRoute
from nanovllm_mlx.serving.protocol import (
    ERROR_RESPONSES,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from nanovllm_mlx.serving.settings import ServerSettings, default_allowed_hosts
from nanovllm_mlx.serving.state import ServerState
from nanovllm_mlx.serving.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    detokenize,
    tokenize,
)

logger = logging.getLogger("nanovllm_mlx.serving")

__all__ = ["ServerSettings", "bind_socket", "create_app", "run_server", "serve"]


def _routes(state: ServerState) -> APIRouter:
    router = APIRouter(route_class=ThreadedJSONRoute)

    @router.get("/health")
    async def health() -> JSONResponse:
        if not state.engine_thread.alive:
            return APIError(503, "the engine thread is not running").response()
        return JSONResponse({"status": "ok"})

    @router.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[state.model_card()])

    @router.get("/v1/models/{model:path}", responses=ERROR_RESPONSES)
    async def model(model: str) -> ModelCard:
        state.check_model(model)
        return state.model_card()

    @router.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize_text(body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's: a prompt, or messages through the chat template, as token ids."""
        return await tokenize(body, state)

    @router.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize_ids(body: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's: token ids as text."""
        return await detokenize(body, state)

    @router.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Continue a prompt; `"stream": true` answers with server-sent events."""
        return await create_completion(body, request, state)

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Answer a conversation; `"stream": true` answers with server-sent events."""
        return await create_chat_completion(body, request, state)

    return router


def create_app(
    engine_or_model: LLMEngine | str | None = None,
    settings: ServerSettings | None = None,
    **engine_kwargs: Any,
) -> FastAPI:
    """The ASGI app. Given a model path (or None for the default model), the engine is
    built inside the engine thread, so that MLX's thread-local streams belong to the
    thread that uses them; load errors are raised here."""
    settings = settings or ServerSettings()
    if isinstance(engine_or_model, LLMEngine):
        if engine_kwargs:
            raise ValueError("engine options go with a model path, not a built engine")
        engine_thread = EngineThread(engine_or_model, max_waiting=settings.max_waiting)
    else:
        model = engine_or_model

        def build() -> LLMEngine:
            return LLMEngine(model, **engine_kwargs)

        engine_thread = EngineThread(build=build, max_waiting=settings.max_waiting)
    state = ServerState(engine_thread, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_thread.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine_thread.stop)

    app = FastAPI(
        title="nanovllm-mlx",
        summary="An OpenAI-compatible server for the nanovllm-mlx engine.",
        lifespan=lifespan,
    )
    app.state.server = state
    app.state.engine_thread = engine_thread

    def count_rejection(request: Request, status: int) -> None:
        if not getattr(request.state, "accepted", False):
            state.metrics.rejected.labels(str(status)).inc()

    install_handlers(app, count_rejection)
    app.add_middleware(
        Guard,
        settings=settings,
        queue_full=engine_thread.full,
        on_reject=lambda status: state.metrics.rejected.labels(str(status)).inc(),
    )
    app.include_router(_routes(state))
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, made before the model loads so that a bad or busy port
    is reported at once; uvicorn listens on it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except (OSError, OverflowError) as e:
        sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        hint = " (is another server running there? pick another --port)"
        raise OSError(
            f"cannot listen on {host}:{port}: {reason}"
            + (hint if getattr(e, "errno", None) == errno.EADDRINUSE else "")
        ) from None
    return sock


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # uvicorn says where it listens only for sockets it bound itself.
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port
            )


def serve(
    app: FastAPI,
    sock: socket.socket,
    *,
    log_config: dict[str, Any] | None = uvicorn.config.LOGGING_CONFIG,
    access_log: bool = True,
) -> None:
    """Serve app on the bound socket until interrupted."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=log_config,
        access_log=access_log,
        # Streams still running at shutdown get 5 s, then are cancelled (and aborted).
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    # An engine that can never step again (a tensor-parallel rank died) ends the server;
    # the caller reads engine_thread.fatal for the reason.
    app.state.engine_thread.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])


def run_server(
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    **engine_kwargs: Any,
) -> None:
    """Bind the port, load the model, then serve it until interrupted. Bound to loopback,
    the server answers loopback Host names only, unless settings say otherwise."""
    sock = bind_socket(host, port)
    try:
        if settings is None:
            settings = ServerSettings(allowed_hosts=default_allowed_hosts(host))
        serve(create_app(model, settings, **engine_kwargs), sock)
    finally:
        sock.close()
