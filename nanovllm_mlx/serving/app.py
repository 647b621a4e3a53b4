"""OpenAI-compatible HTTP server: FastAPI on uvicorn in front of one engine thread.

Endpoints: /v1/completions, /v1/chat/completions (both with SSE streaming), /v1/models,
/health, /metrics (Prometheus). Request handlers parse and validate on the event loop and
hand the request to the EngineThread (engine_thread.py), the only code that touches the
engine; concurrent requests therefore share the engine's running batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanovllm_mlx.engine.llm_engine import LLMEngine, RequestOutput
from nanovllm_mlx.sampling_params import SamplingParams
from nanovllm_mlx.serving.engine_thread import EngineError, EngineThread

logger = logging.getLogger("nanovllm_mlx.serving.app")

T = TypeVar("T")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# Errors ---------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def server_error(message: str, status: int = 500) -> APIError:
    return APIError(status, message, type="server_error")


def _validation_error(errors: list[dict]) -> APIError:
    """One 400 from pydantic's error list; `param` is the top-level request field."""
    if not errors:
        return bad_request("invalid request body")
    if errors[0]["type"] == "json_invalid":
        return bad_request(f"malformed JSON body: {errors[0]['msg']}", code="invalid_json")
    paths = [[str(p) for p in e["loc"] if p != "body"] for e in errors]
    if not paths[0]:
        return bad_request(f"request body: {errors[0]['msg']}")
    param = paths[0][0]
    # A union field reports one error per member: say them all, briefly.
    parts = [
        f"{'.'.join(path)}: {e['msg']}"
        for path, e in zip(paths[:4], errors)
        if path and path[0] == param
    ]
    return bad_request("; ".join(parts), param)


# Request bodies -------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Body(BaseModel):
    # strict: "max_tokens": "5" or 5.0 is a client bug, not a number to guess at. Unknown
    # fields are ignored like vLLM does; the known unsupported ones are refused below.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Body):
    prompt: Any = None  # str | list[int] | [str] | [list[int]]: checked by _completion_prompt
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None


_SAMPLING_FIELDS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "stop",
    "stop_token_ids",
}


def _refuse_unsupported(body: _Body) -> None:
    if body.n is not None and body.n != 1:
        raise bad_request("only n=1 is supported", "n")
    unsupported: dict[str, object] = {
        "presence_penalty": body.presence_penalty not in (None, 0, 0.0),
        "frequency_penalty": body.frequency_penalty not in (None, 0, 0.0),
        "logit_bias": bool(body.logit_bias),
    }
    if isinstance(body, CompletionBody):
        unsupported |= {
            "echo": body.echo,
            "suffix": bool(body.suffix),
            "best_of": body.best_of not in (None, 1),
        }
    if isinstance(body, ChatBody):
        unsupported |= {"tools": bool(body.tools)}
    for name, used in unsupported.items():
        if used:
            raise bad_request(f"{name} is not supported by this server", name)


def _sampling_params(body: _Body, max_tokens: int, logprobs: bool) -> SamplingParams:
    top_k = body.top_k
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM spells "off" as -1
            min_p=0.0 if body.min_p is None else body.min_p,
            repetition_penalty=(
                1.0 if body.repetition_penalty is None else body.repetition_penalty
            ),
            seed=body.seed,
            max_tokens=max_tokens,
            stop=[] if body.stop is None else body.stop,
            stop_token_ids=body.stop_token_ids or [],
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as e:
        # SamplingParams' messages start with the field's name.
        word = str(e).split(" ", 1)[0]
        raise bad_request(str(e), word if word in _SAMPLING_FIELDS else None) from e


# Metrics --------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum}",
            f"{name}_count {self.count}",
        ]
        return out


class ServerMetrics:
    """Per-request counters, kept on the asyncio side (single-threaded, no locks)."""

    def __init__(self) -> None:
        self.finished: dict[str, int] = {}
        self.latency = _Histogram(_LATENCY_BUCKETS)
        self.ttft = _Histogram(_LATENCY_BUCKETS)

    def finish(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1


def _render_metrics(stats: dict, engine_thread: dict, metrics: ServerMetrics) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

    metric(
        "nanovllm_requests_running", "gauge", "Sequences in the running batch.", stats["running"]
    )
    metric(
        "nanovllm_requests_waiting", "gauge", "Sequences waiting for admission.", stats["waiting"]
    )
    metric("nanovllm_kv_blocks_used", "gauge", "KV cache blocks in use.", stats["kv_blocks_used"])
    metric("nanovllm_kv_blocks_total", "gauge", "KV cache blocks.", stats["kv_blocks_total"])
    metric(
        "nanovllm_kv_blocks_cached",
        "gauge",
        "Free KV blocks still holding a reusable prefix.",
        stats["kv_blocks_cached"],
    )
    metric(
        "nanovllm_prefix_cache_hit_rate",
        "gauge",
        "Share of prompt tokens served from the prefix cache.",
        stats["prefix_hit_rate"],
    )
    metric(
        "nanovllm_prompt_tokens_total",
        "counter",
        "Prompt tokens computed (prefix-cache hits excluded, recomputation included).",
        stats["prompt_tokens"],
    )
    metric(
        "nanovllm_generation_tokens_total",
        "counter",
        "Tokens generated.",
        stats["output_tokens"],
    )
    metric("nanovllm_preemptions_total", "counter", "Sequences preempted.", stats["preemptions"])
    metric("nanovllm_engine_steps_total", "counter", "Engine steps.", engine_thread["steps"])
    metric(
        "nanovllm_engine_step_sequences_total",
        "counter",
        "Sum of batch sizes over steps (divide by steps for the mean batch size).",
        engine_thread["step_sequences"],
    )
    metric(
        "nanovllm_batch_size_peak",
        "gauge",
        "Largest batch the engine has run.",
        engine_thread["peak_batch_size"],
    )
    metric(
        "nanovllm_engine_step_failures_total",
        "counter",
        "Engine steps that raised (their requests got a 500).",
        engine_thread["step_failures"],
    )
    name = "nanovllm_requests_finished_total"
    lines += [
        f"# HELP {name} Requests ended, by finish reason (abort: the client left).",
        f"# TYPE {name} counter",
    ]
    for reason in sorted(set(metrics.finished) | {"stop", "length", "abort", "error"}):
        lines.append(f'{name}{{finish_reason="{reason}"}} {metrics.finished.get(reason, 0)}')
    for hist_name, hist, help_ in (
        ("nanovllm_request_latency_seconds", metrics.latency, "Request arrival to last token."),
        ("nanovllm_time_to_first_token_seconds", metrics.ttft, "Request arrival to first token."),
    ):
        lines += [f"# HELP {hist_name} {help_}", f"# TYPE {hist_name} histogram"]
        lines += hist.lines(hist_name)
    return "\n".join(lines) + "\n"


# One request's life on the asyncio side -------------------------------------------------


class _Handle:
    def __init__(
        self,
        engine_thread: EngineThread,
        metrics: ServerMetrics,
        request_id: str,
        queue: asyncio.Queue[RequestOutput | EngineError],
        arrival: float,
    ):
        self.engine_thread = engine_thread
        self.metrics = metrics
        self.request_id = request_id
        self.queue = queue
        self.arrival = arrival
        self.done = False
        self.first_token = False

    async def batches(self) -> AsyncIterator[list[RequestOutput]]:
        """Outputs as they come; several per item when the client fell behind the engine."""
        while not self.done:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            outputs: list[RequestOutput] = []
            for item in items:
                if isinstance(item, EngineError):
                    self.done = True
                    self.metrics.finish("error")
                    raise server_error(str(item), item.status)
                outputs.append(item)
                if item.finished:
                    self.done = True
                    self.metrics.finish(item.finish_reason or "stop")
                    self.metrics.latency.observe(time.perf_counter() - self.arrival)
            if not self.first_token:
                self.first_token = True
                self.metrics.ttft.observe(time.perf_counter() - self.arrival)
            yield outputs

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.finish("abort")
            self.engine_thread.abort(self.request_id)


class _EventStream(StreamingResponse):
    """Server-sent events whose request is aborted however the response ends (client gone,
    cancelled, or an error), not only when the generator is next resumed."""

    def __init__(self, content: AsyncIterator[str], handle: _Handle):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.handle = handle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.abort()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(out: RequestOutput) -> dict:
    return {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# The app --------------------------------------------------------------------------------


class _Server:
    """State shared by the endpoints of one app."""

    def __init__(self, engine_thread: EngineThread, model_name: str | None, api_key: str | None):
        engine = engine_thread.start()
        self.engine_thread = engine_thread
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.model_name = model_name or engine.model_name
        # The path the engine was loaded from also names the model.
        self.model_aliases = {self.model_name, engine.model_name}
        if engine.config.model:
            self.model_aliases.add(engine.config.model)
        self.api_key = api_key
        self.created = int(time.time())
        self.metrics = ServerMetrics()

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_aliases:
            raise bad_request(
                f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                "model",
                "model_not_found",
            )

    def check_prompt_len(self, n: int, param: str) -> None:
        if n >= self.max_model_len:
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the prompt has {n} tokens, leaving no room to generate",
                param,
                "context_length_exceeded",
            )

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def run(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        arrival: float,
        param: str,
    ) -> _Handle:
        try:
            queue = await self.engine_thread.submit(request_id, prompt, params)
        except ValueError as e:  # the engine's verdict on the prompt
            raise bad_request(str(e), param) from e
        return _Handle(self.engine_thread, self.metrics, request_id, queue, arrival)

    async def collect(self, handle: _Handle, request: Request) -> list[RequestOutput] | None:
        """All outputs of a non-streamed request, or None if its client went away first."""

        async def drain() -> list[RequestOutput]:
            outputs: list[RequestOutput] = []
            async for batch in handle.batches():
                outputs += batch
            return outputs

        collector = asyncio.ensure_future(drain())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collector.done():
                collector.cancel()
                handle.abort()
        if collector.cancelled() or not collector.done():
            return None
        return collector.result()


async def _parse(request: Request, model: type[T]) -> T:
    body = await request.body()
    try:
        return model.model_validate_json(body)  # type: ignore[attr-defined]
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from None


def _completion_prompt(prompt: object, server: _Server) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        return server.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt  # ids out of the vocabulary are refused by the engine
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, (str, list)) for p in prompt)
    ):
        raise bad_request(
            "one prompt per request: send several requests instead (they share the batch)",
            "prompt",
        )
    if prompt is None:
        raise bad_request("prompt is required", "prompt", "missing")
    raise bad_request(
        "prompt must be a string, a list of token ids, or a list holding one of them", "prompt"
    )


def _chat_prompt(messages: list[ChatMessage] | None, server: _Server) -> list[int]:
    if messages is None:
        raise bad_request("messages is required", "messages", "missing")
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    plain: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise bad_request("only text content parts are supported", f"messages.{i}")
            content = "".join(p.text or "" for p in content)
        plain.append({"role": m.role, "content": content or ""})
    try:
        return server.tokenizer.encode_chat(plain)
    except Exception as e:  # the template's raise_exception, or a jinja error
        raise bad_request(f"chat template failed: {e}", "messages") from e


def _completion_logprobs(server: _Server, outputs: list[RequestOutput], offset: int) -> dict:
    tokens = [server.token_text(t) for o in outputs for t in o.token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for o in outputs for lp in (o.logprobs or [])],
        "top_logprobs": None,
        "text_offset": offsets,
    }


def _chat_logprobs(server: _Server, outputs: list[RequestOutput]) -> dict:
    content = []
    for o in outputs:
        for token, lp in zip(o.token_ids, o.logprobs or []):
            text = server.token_text(token)
            content.append(
                {"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
            )
    return {"content": content}


def create_app(
    engine_or_model: LLMEngine | str | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    **engine_kwargs: Any,
) -> FastAPI:
    """The ASGI app. Given a model path (or None for the default model), the engine is
    built inside the engine thread, so that MLX's thread-local streams belong to the
    thread that uses them; load errors are raised here."""
    if isinstance(engine_or_model, LLMEngine):
        if engine_kwargs:
            raise ValueError("engine options go with a model path, not a built engine")
        engine_thread = EngineThread(engine_or_model)
    else:
        model = engine_or_model

        def build() -> LLMEngine:
            return LLMEngine(model, **engine_kwargs)

        engine_thread = EngineThread(build=build)
    server = _Server(engine_thread, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_thread.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_thread.stop)

    app = FastAPI(title="nanovllm-mlx", lifespan=lifespan)
    app.state.server = server
    app.state.engine_thread = engine_thread

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return server_error(str(exc), exc.status).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return server_error(f"internal error: {exc!r}").response()

    async def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), server.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or incorrect API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/health")
    async def health() -> Response:
        if not engine_thread.alive:
            return server_error("the engine thread is not running", 503).response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        def snapshot(engine: LLMEngine) -> tuple[dict, dict]:
            stats = engine.stats()
            counters = {
                "steps": stats["steps"],
                "step_sequences": stats["batch_sequences"],
                "peak_batch_size": stats["peak_batch_size"],
                "step_failures": engine_thread.step_failures,
            }
            return stats, counters

        stats, counters = await engine_thread.call(snapshot)
        return PlainTextResponse(
            _render_metrics(stats, counters, server.metrics),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @v1.get("/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "nanovllm-mlx",
                    "max_model_len": server.max_model_len,
                }
            ],
        }

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        arrival = time.perf_counter()
        body = await _parse(request, CompletionBody)
        server.check_model(body.model)
        _refuse_unsupported(body)
        if body.logprobs is not None and body.logprobs != 0:
            raise bad_request(
                "only the sampled token's logprob is available: use logprobs=0", "logprobs"
            )
        prompt = _completion_prompt(body.prompt, server)
        server.check_prompt_len(len(prompt), "prompt")
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = _sampling_params(body, max_tokens, logprobs=body.logprobs is not None)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        handle = await server.run(request_id, prompt, params, arrival, "prompt")
        created = int(time.time())
        base = {"id": request_id, "object": "text_completion", "created": created}
        base["model"] = server.model_name
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        if body.stream:

            async def events() -> AsyncIterator[str]:
                offset = 0
                last: RequestOutput | None = None
                try:
                    async for batch in handle.batches():
                        last = batch[-1]
                        text = "".join(o.text for o in batch)
                        choice: dict[str, Any] = {
                            "index": 0,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": last.finish_reason if last.finished else None,
                        }
                        if params.logprobs:
                            choice["logprobs"] = _completion_logprobs(server, batch, offset)
                        elif not text and not last.finished:
                            continue
                        offset += len(text)
                        chunk = {**base, "choices": [choice]}
                        if include_usage:
                            chunk["usage"] = None
                        yield _sse(chunk)
                    if include_usage and last is not None:
                        yield _sse({**base, "choices": [], "usage": _usage(last)})
                except APIError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"

            return _EventStream(events(), handle)

        outputs = await server.collect(handle, request)
        if outputs is None:
            return Response(status_code=499)  # nobody is listening
        last = outputs[-1]
        return JSONResponse(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(o.text for o in outputs),
                        "logprobs": (
                            _completion_logprobs(server, outputs, 0) if params.logprobs else None
                        ),
                        "finish_reason": last.finish_reason,
                    }
                ],
                "usage": _usage(last),
            }
        )

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.perf_counter()
        body = await _parse(request, ChatBody)
        server.check_model(body.model)
        _refuse_unsupported(body)
        if body.top_logprobs:
            raise bad_request(
                "only the sampled token's logprob is available: use top_logprobs=0",
                "top_logprobs",
            )
        prompt = _chat_prompt(body.messages, server)
        server.check_prompt_len(len(prompt), "messages")
        max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = body.max_tokens
        if max_tokens is None:
            # OpenAI's default: until the context is full.
            max_tokens = server.max_model_len - len(prompt)
        params = _sampling_params(body, max_tokens, logprobs=body.logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        handle = await server.run(request_id, prompt, params, arrival, "messages")
        base = {
            "id": request_id,
            "object": "chat.completion.chunk" if body.stream else "chat.completion",
            "created": int(time.time()),
            "model": server.model_name,
        }
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        if body.stream:

            def chunk(delta: dict, finish_reason: str | None = None, lp: dict | None = None) -> str:
                choice = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": lp,
                    "finish_reason": finish_reason,
                }
                data: dict[str, Any] = {**base, "choices": [choice]}
                if include_usage:
                    data["usage"] = None
                return _sse(data)

            async def events() -> AsyncIterator[str]:
                last: RequestOutput | None = None
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for batch in handle.batches():
                        last = batch[-1]
                        text = "".join(o.text for o in batch)
                        if text or params.logprobs:
                            lp = _chat_logprobs(server, batch) if params.logprobs else None
                            yield chunk({"content": text}, lp=lp)
                        if last.finished:
                            yield chunk({}, last.finish_reason)
                    if include_usage and last is not None:
                        yield _sse({**base, "choices": [], "usage": _usage(last)})
                except APIError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"

            return _EventStream(events(), handle)

        outputs = await server.collect(handle, request)
        if outputs is None:
            return Response(status_code=499)
        last = outputs[-1]
        return JSONResponse(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(o.text for o in outputs),
                        },
                        "logprobs": _chat_logprobs(server, outputs) if params.logprobs else None,
                        "finish_reason": last.finish_reason,
                    }
                ],
                "usage": _usage(last),
            }
        )

    app.include_router(v1)
    return app


def run_server(
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    **engine_kwargs: Any,
) -> None:
    """Load the model, then serve it until interrupted (`nanovllm serve`)."""
    app = create_app(model, api_key=api_key, model_name=model_name, **engine_kwargs)
    # Streams still running at shutdown get 5 s, then are cancelled (and aborted).
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
