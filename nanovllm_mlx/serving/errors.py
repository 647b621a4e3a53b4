"""OpenAI-style error bodies, {"error": {message, type, param, code}}, and the app's exception
handlers: every failure a client can see is answered in that shape."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.serving.protocol import ErrorBody, ErrorResponse

logger = logging.getLogger("nanovllm_mlx.serving")


class APIError(Exception):
    """An error answered with OpenAI's body and the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected (or its request was otherwise abandoned): nobody to answer."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def invalid_request(e: InvalidRequestError, renames: dict[str, str] | None = None) -> APIError:
    """The engine's typed refusal as a 400; `renames` maps the engine's parameter names to the
    endpoint's (a chat request's prompt is its `messages`)."""
    param = (renames or {}).get(e.param or "", e.param)
    return bad_request(str(e), param, e.code)


def validation_error(errors: list[Any]) -> APIError:
    """One 400 from pydantic's error list; `param` is the top-level request field."""
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return bad_request(f"malformed JSON body: {detail}", code="invalid_json")
    paths = [[str(p) for p in e["loc"] if p != "body"] for e in errors]
    if not paths[0]:
        return bad_request(f"request body: {first['msg']}")
    param = paths[0][0]
    # A union field reports one error per member: say them all, briefly.
    parts = [
        f"{'.'.join(path)}: {e['msg']}"
        for path, e in zip(paths[:4], errors)
        if path and path[0] == param
    ]
    return bad_request("; ".join(parts), param)


def install_handlers(app: FastAPI, on_error: Callable[[Request, int], None]) -> None:
    """Exception handlers for the app; on_error(request, status) sees every error answered."""

    def answer(request: Request, error: APIError) -> JSONResponse:
        on_error(request, error.status)
        return error.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(InvalidRequestError)
    async def engine_refusal(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return answer(request, invalid_request(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404, 405, and the 413 of FastAPI's body-size limit.
        return answer(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return answer(request, APIError(500, f"internal error: {exc!r}"))
