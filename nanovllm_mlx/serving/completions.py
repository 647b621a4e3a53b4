"""POST /v1/completions: a prompt (text or token ids) continued."""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from nanovllm_mlx.engine.llm_engine import RequestOutput
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.serving.errors import bad_request
from nanovllm_mlx.serving.handle import answer
from nanovllm_mlx.serving.prepare import check_room, refuse_unsupported, sampling_params
from nanovllm_mlx.serving.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    usage,
)
from nanovllm_mlx.serving.state import ServerState
from nanovllm_mlx.serving.streaming import RendererBase

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


Prompt = str | list[int] | list[str] | list[list[int]]


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the one prompt a request holds. Empty prompts and ids outside the
    vocabulary are the engine's to refuse."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        raise bad_request(
            "one prompt per request: send several requests instead (they share the batch)",
            "prompt",
        )
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)  # type: ignore[arg-type]


class CompletionRenderer(RendererBase):
    offset = 0  # characters streamed so far, for text_offset

    def _completion(self, choices: list[CompletionChoice], **extra: object) -> Completion:
        return Completion(**self.answer, choices=choices, **extra)

    def _logprobs(self, outputs: list[RequestOutput], offset: int) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        tokens = [self.token_text(t) for o in outputs for t in o.token_ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp for o in outputs for lp in (o.logprobs or [])],
            text_offset=offsets,
        )

    def start(self) -> list[Completion]:
        return []

    def deltas(self, batch: list[RequestOutput]) -> list[Completion]:
        last = batch[-1]
        text = "".join(o.text for o in batch)
        if not text and not last.finished and not self.logprobs:
            return []
        choice = CompletionChoice(
            text=text,
            logprobs=self._logprobs(batch, self.offset),
            finish_reason=last.finish_reason if last.finished else None,
        )
        self.offset += len(text)
        return [self._completion([choice])]

    def usage_chunk(self, last: RequestOutput) -> Completion:
        return self._completion([], usage=usage(last))

    def response(self, outputs: list[RequestOutput]) -> Completion:
        last = outputs[-1]
        choice = CompletionChoice(
            text="".join(o.text for o in outputs),
            logprobs=self._logprobs(outputs, 0),
            finish_reason=last.finish_reason,
        )
        return self._completion([choice], usage=usage(last))


async def create_completion(
    body: CompletionRequest, request: Request, state: ServerState
) -> Response:
    state.check_model(body.model)
    refuse_unsupported(body)
    explicit = body.max_tokens
    logprobs = body.logprobs is not None
    max_tokens = DEFAULT_MAX_TOKENS if explicit is None else explicit
    params = sampling_params(body, max_tokens, logprobs)
    # Tokenizing a long prompt takes a while: not on the event loop.
    prompt = await run_in_threadpool(prompt_ids, body.prompt, state.tokenizer)
    if explicit is None:
        params.max_tokens = max(1, min(DEFAULT_MAX_TOKENS, state.max_model_len - len(prompt)))
    else:
        check_room(len(prompt), explicit, state.max_model_len, "prompt", "max_tokens")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    return await answer(
        state.handle(request, request_id),
        prompt,
        params,
        CompletionRenderer(request_id, state.model_name, state.token_text, logprobs),
        stream=body.stream,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
        renames={},
    )
