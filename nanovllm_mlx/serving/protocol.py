"""The OpenAI API's request and response bodies as pydantic models (they are also /docs).

Requests are strict, so `"max_tokens": "5"` or `5.0` is a 400 naming the field rather than a
number guessed at, and ignore unknown fields as vLLM does; the known unsupported ones are
refused by name (serving/prepare.py). Range checks are SamplingParams' and the engine's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from nanovllm_mlx.serving.tools.protocol import (
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallOut,
    omit_none,
)

# A request's stop strings are searched after every token it samples, in the engine
# thread: bound them so that one request cannot slow the whole batch down.
MAX_STOP_STRINGS = 32
MAX_STOP_TOKEN_IDS = 1024
# A bias is one scatter entry per row per step: bounded like the stop ids.
MAX_LOGIT_BIAS = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # OpenAI's schema makes these fields nullable: clients (litellm, langchain) send
        # an explicit null for "not given".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text, json_object (any JSON object) or json_schema (output that "
        "validates against json_schema.schema); constrained with llguidance."
    )
    json_schema: JsonSchemaFormat | None = None


class GenerationRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="-1 or 0: off.")
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    n: int | None = Field(None, description="Choices (1-128), forked after one prefill.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = Field(
        None, description="Token id (as a string) to a bias, clamped to [-100, 100]."
    )
    min_tokens: int | None = None
    user: str | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A string or token ids, or a list of several: they run as one batch, "
        "choice index = prompt index * n + choice."
    )
    logprobs: int | None = Field(
        None, description="Top logprobs per token (0-20; 0: the sampled token's alone)."
    )
    prompt_logprobs: int | None = Field(
        None, description="vLLM's: each prompt token's logprob and the top N (0-20)."
    )
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="0-20; needs logprobs.")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description='"required" and a named function are guaranteed: decoding is '
        "constrained to the model's tool-call format and the functions' schemas.",
    )
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Variables for the chat template, e.g. enable_thinking."
    )
    reasoning_effort: str | None = Field(None, description="Passed to the chat template.")


# Responses ---------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int = Field(description="Exact within the top N; N + 1 for a token below them.")
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    # vLLM's prompt_logprobs: per prompt token (None for the first), token id -> entry.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None

    @model_serializer(mode="wrap")
    def _omit_prompt_logprobs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body = handler(self)
        if body.get("prompt_logprobs") is None:
            body.pop("prompt_logprobs", None)
        return body


# The answers list id, object, created, model in that order, as OpenAI's do (and as this
# server always has): hence no shared base class for those fields.
class Completion(BaseModel):
    """A /v1/completions answer, and each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # content stays, as null when the answer is only tool calls (as OpenAI's).
        return {k: v for k, v in handler(self).items() if v is not None or k == "content"}


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    # OpenAI's deltas carry only what changed: {"content": "..."}, and {} at the end.
    _omit_none = model_serializer(mode="wrap")(omit_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanovllm-mlx"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "Invalid request: `param` names the field"),
        (401, "Missing or wrong API key"),
        (404, "No such model (code model_not_found)"),
        (413, "Request body too large"),
        (415, "Content-Type is not application/json"),
        (500, "The engine failed this request"),
        (503, "Too many requests waiting (see Retry-After), or the engine is not running"),
        (504, "The request took longer than the server's --request-timeout"),
    )
}
