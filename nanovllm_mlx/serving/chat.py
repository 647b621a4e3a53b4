"""POST /v1/chat/completions: messages through the model's chat template, answered."""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from nanovllm_mlx.engine.llm_engine import RequestOutput
from nanovllm_mlx.engine.output_processor import merge_outputs
from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.serving.errors import bad_request, invalid_request
from nanovllm_mlx.serving.handle import answer
from nanovllm_mlx.serving.prepare import check_room, refuse_unsupported, sampling_params
from nanovllm_mlx.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    Delta,
    TokenLogprob,
    TopLogprob,
)
from nanovllm_mlx.serving.state import ServerState
from nanovllm_mlx.serving.streaming import RendererBase


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise bad_request("only text content parts are supported", f"messages.{i}")
            content = "".join(p.text or "" for p in content)
        plain.append({"role": m.role, "content": content or ""})
    return plain


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    try:
        return tokenizer.encode_chat(messages)
    except Exception as e:  # the template's raise_exception, or a jinja error
        raise bad_request(f"chat template failed: {e}", "messages") from e


class ChatRenderer(RendererBase):
    def _chunk(self, choices: list[ChatChunkChoice], **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.answer, choices=choices, **extra)

    def _entry(self, token: int, logprob: float) -> TopLogprob:
        text = self.token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def _logprobs(self, outputs: list[RequestOutput]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        content = []
        for o in outputs:
            tops = o.top_logprobs or [{} for _ in o.token_ids]
            for token, lp, top in zip(o.token_ids, o.logprobs or [], tops):
                entry = self._entry(token, lp)
                content.append(
                    TokenLogprob(
                        **entry.model_dump(),
                        top_logprobs=[self._entry(t, v) for t, v in top.items()],
                    )
                )
        return ChatLogprobs(content=content)

    def start(self) -> list[ChatCompletionChunk]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            for i in range(self.n)
        ]

    def deltas(self, batch: list[RequestOutput]) -> list[ChatCompletionChunk]:
        chunks = []
        for index, outputs in self.by_choice(batch).items():
            text = "".join(o.text for o in outputs)
            if text or self.logprobs:
                delta = Delta(content=text)
                choice = ChatChunkChoice(index=index, delta=delta, logprobs=self._logprobs(outputs))
                chunks.append(self._chunk([choice]))
            last = outputs[-1]
            if last.finished:
                end = ChatChunkChoice(index=index, delta=Delta(), finish_reason=last.finish_reason)
                chunks.append(self._chunk([end]))
        return chunks

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._chunk([], usage=self.usage())

    def response(self, outputs: list[RequestOutput]) -> ChatCompletion:
        choices = []
        for index, outs in self.by_choice(outputs).items():
            merged = merge_outputs(outs)
            choices.append(
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=merged.text),
                    logprobs=self._logprobs([merged]),
                    finish_reason=merged.finish_reason,
                )
            )
        return ChatCompletion(**self.answer, choices=choices, usage=self.usage())


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ServerState
) -> Response:
    state.check_model(body.model)
    refuse_unsupported(body)
    explicit, param = body.max_completion_tokens, "max_completion_tokens"
    if explicit is None:
        explicit, param = body.max_tokens, "max_tokens"
    renames = {"prompt": "messages", "max_tokens": param, "json_schema": "response_format"}
    try:
        # Without max_tokens: the rest of the context (None), which the engine resolves.
        params = sampling_params(
            body, explicit, body.logprobs, top_logprobs=body.top_logprobs or 0
        )
    except InvalidRequestError as e:
        raise invalid_request(e, renames) from None
    messages = plain_messages(body.messages)
    # The chat template and the tokenizer take a while on long chats: not on the event loop.
    prompt = await run_in_threadpool(encode_chat, state.tokenizer, messages)
    if explicit is not None:
        check_room(len(prompt), explicit, state.max_model_len, "messages", param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    handle = state.handle(request, request_id, 1)
    renderer = ChatRenderer(
        request_id, state.model_name, state.token_text, body.logprobs, handle.engine_ids, params.n
    )
    return await answer(
        handle,
        [prompt],
        params,
        renderer,
        stream=body.stream,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
        renames=renames,
    )
