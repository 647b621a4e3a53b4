"""vLLM's /tokenize and /detokenize (lm-eval's tokenizer backend for API models looks for
them): text or a chat to token ids through the server's own tokenizer and template, and
back."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

from nanovllm_mlx.serving.chat_messages import template_messages
from nanovllm_mlx.serving.errors import bad_request
from nanovllm_mlx.serving.protocol import ChatMessage, _Strict
from nanovllm_mlx.serving.state import ServerState
from nanovllm_mlx.serving.tools.protocol import Tool


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(body: TokenizeRequest, state: ServerState) -> TokenizeResponse:
    state.check_model(body.model)
    tokenizer = state.tokenizer
    if body.messages is not None:
        kwargs = dict(body.chat_template_kwargs or {})
        if body.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        messages = template_messages(body.messages)

        def encode() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=body.add_generation_prompt, **kwargs
                )
            except Exception as e:  # the template's raise_exception, or a jinja error
                raise bad_request(f"chat template failed: {e}", "messages") from e
            return tokenizer.encode_text(text)

        ids = await run_in_threadpool(encode)
    else:
        assert body.prompt is not None
        ids = await run_in_threadpool(tokenizer.encode, body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)


async def detokenize(body: DetokenizeRequest, state: ServerState) -> DetokenizeResponse:
    state.check_model(body.model)
    size = state.tokenizer.tokenizer.get_vocab_size(True)
    bad = next((t for t in body.tokens if not 0 <= t < size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0-{size - 1})", "tokens")
    text = await run_in_threadpool(state.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
