"""POST /v1/chat/completions: messages through the model's chat template, answered."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from nanovllm_mlx.engine.llm_engine import RequestOutput
from nanovllm_mlx.engine.output_processor import merge_outputs
from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.serving.chat_messages import template_kwargs, template_messages
from nanovllm_mlx.serving.chat_output import ChoiceFactory, ChoiceOutput, message, output_text
from nanovllm_mlx.serving.errors import bad_request, invalid_request
from nanovllm_mlx.serving.handle import answer
from nanovllm_mlx.serving.harmony import HARMONY_TAGS, HarmonySplitter, template_is_harmony
from nanovllm_mlx.serving.prepare import check_room, refuse_unsupported, sampling_params
from nanovllm_mlx.serving.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
)
from nanovllm_mlx.serving.reasoning import (
    THINK_TAGS,
    ThinkSplitter,
    after_thinking,
    prompt_opens_thinking,
    template_thinks,
)
from nanovllm_mlx.serving.state import ServerState
from nanovllm_mlx.serving.streaming import RendererBase
from nanovllm_mlx.serving.tools.choice import tool_setup


def render_chat(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], kwargs: dict[str, Any]
) -> tuple[str, list[int]]:
    """The chat's text (the answer's parsers read how it ends) and its token ids."""
    try:
        text = tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as e:  # the template's raise_exception, or a jinja error
        raise bad_request(f"chat template failed: {e}", "messages") from e
    return text, tokenizer.encode_text(text)


class ChatRenderer(RendererBase):
    def __init__(
        self, *args: Any, choice_output: ChoiceFactory, markers: dict[int, str], **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.choice_output = choice_output
        self.markers = markers
        self._streams: dict[int, ChoiceOutput] = {}

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
            stream = self._streams.setdefault(index, self.choice_output())
            last = outputs[-1]
            text = output_text(outputs, self.markers)
            deltas, reason = stream.step(text, last.finished, last.finish_reason)
            if self.logprobs and not deltas:
                deltas = [Delta(content="")]  # the tokens' logprobs, while their text waits
            for i, delta in enumerate(deltas):
                logprobs = self._logprobs(outputs) if i == 0 else None
                chunks.append(
                    self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)])
                )
            if last.finished:
                end = ChatChunkChoice(index=index, delta=Delta(), finish_reason=reason)
                chunks.append(self._chunk([end]))
        return chunks

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._chunk([], usage=self.usage())

    def response(self, outputs: list[RequestOutput]) -> ChatCompletion:
        choices = []
        for index, outs in self.by_choice(outputs).items():
            merged = merge_outputs(outs)
            text = output_text(outs, self.markers)
            deltas, reason = self.choice_output().step(text, True, merged.finish_reason)
            choices.append(
                ChatChoice(
                    index=index,
                    message=message(deltas),
                    logprobs=self._logprobs([merged]),
                    finish_reason=reason,
                )
            )
        return ChatCompletion(**self.answer, choices=choices, usage=self.usage())


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ServerState
) -> Response:
    state.check_model(body.model)
    refuse_unsupported(body)
    tools = tool_setup(body, state.tool_parser, state.special_ids)
    explicit, param = body.max_completion_tokens, "max_completion_tokens"
    if explicit is None:
        explicit, param = body.max_tokens, "max_tokens"
    renames = {
        "prompt": "messages",
        "max_tokens": param,
        "json_schema": "response_format",
        "grammar": "tools",
    }
    messages = template_messages(body.messages)
    kwargs = template_kwargs(body, tools.template_tools)
    # The chat template and the tokenizer take a while on long chats: not on the event loop.
    text, prompt = await run_in_threadpool(render_chat, state.tokenizer, messages, kwargs)
    harmony = template_is_harmony(state.tokenizer.chat_template)
    thinks = template_thinks(state.tokenizer.chat_template) and not harmony
    opened = thinks and prompt_opens_thinking(text)
    grammar, lets_think = tools.grammar, False
    if grammar is not None and thinks:
        # The call comes after the thinking, which the grammar lets through.
        thinking_first = after_thinking(grammar, opened, state.special_ids)
        if thinking_first is not None:
            grammar, lets_think = thinking_first, True
    try:
        # Without max_tokens: the rest of the context (None), which the engine resolves.
        params = sampling_params(
            body, explicit, body.logprobs, top_logprobs=body.top_logprobs or 0, grammar=grammar
        )
    except InvalidRequestError as e:
        raise invalid_request(e, renames) from None
    if params.structured and not lets_think:
        # Constrained from the first token (response_format, or <think> tags that are
        # special tokens): the answer does not start in the block the prompt opened.
        opened = False

    def choice_output() -> ChoiceOutput:
        if harmony:  # channels carry the reasoning and the calls alike
            return ChoiceOutput(None, HarmonySplitter())
        return ChoiceOutput(
            tools.parser(tools.template_tools) if tools.parser else None,
            ThinkSplitter(opened) if thinks else None,
        )

    if explicit is not None:
        check_room(len(prompt), explicit, state.max_model_len, "messages", param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    handle = state.handle(request, request_id, 1)
    renderer = ChatRenderer(
        request_id,
        state.model_name,
        state.token_text,
        body.logprobs,
        handle.engine_ids,
        params.n,
        choice_output=choice_output,
        markers=state.special_markers(
            ([tools.parser.start, tools.parser.end or ""] if tools.parser else [])
            + (list(THINK_TAGS) if thinks else [])
            + (list(HARMONY_TAGS) if harmony else [])
        ),
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
