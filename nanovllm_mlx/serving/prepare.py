"""A validated request body to what the engine takes: sampling parameters and checks the
engine does not make itself (features this server lacks, OpenAI's rules between fields,
room in the context).

Range checks stay SamplingParams' and prompt checks the engine's: their InvalidRequestError
names the parameter, and the app's handlers turn it into the 400.
"""

from __future__ import annotations

from typing import Any

from nanovllm_mlx.engine.requests import room
from nanovllm_mlx.sampling_params import SamplingParams
from nanovllm_mlx.serving.errors import bad_request
from nanovllm_mlx.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
)


def refuse_unsupported(body: GenerationRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    unsupported: dict[str, object] = {}
    if isinstance(body, CompletionRequest):
        unsupported["suffix"] = bool(body.suffix)
        if body.stream and (body.best_of or 1) > (body.n or 1):
            raise bad_request(
                "best_of > n cannot be streamed: choices are ranked at the end", "best_of"
            )
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    for name, used in unsupported.items():
        if used:
            raise bad_request(f"{name} is not supported by this server", name)


def _json_schema(body: GenerationRequest) -> dict[str, Any] | None:
    """response_format as the engine's json_schema: OpenAI's json_object is any object."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request(
            'response_format of type "json_schema" needs json_schema.schema', "response_format"
        )
    return fmt.json_schema.schema_


def _logit_bias(body: GenerationRequest) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids spelled as strings."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise bad_request(
                f"logit_bias key {key[:40]!r} is not a token id", "logit_bias"
            ) from None
    return bias


def sampling_params(
    body: GenerationRequest,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int = 0,
    prompt_logprobs: int | None = None,
    best_of: int | None = None,
    grammar: str | None = None,
) -> SamplingParams:
    """SamplingParams from the body, OpenAI's defaults where a field is absent."""
    top_k = body.top_k
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM spells "off" as -1
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body),
        seed=body.seed,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens or 0,
        stop=[] if body.stop is None else body.stop,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos,
        n=1 if body.n is None else body.n,
        best_of=best_of,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        json_schema=_json_schema(body),
        grammar=grammar,
    )
    return params


def check_room(
    num_prompt_tokens: int, max_tokens: int, max_model_len: int, prompt_part: str, param: str
) -> None:
    """Refuse max_tokens beyond the room the prompt leaves, as vLLM does. A prompt that
    leaves no room at all is the engine's to refuse."""
    total = num_prompt_tokens + max_tokens
    if 0 < room(num_prompt_tokens, max_model_len) < max_tokens:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens} + {max_tokens} = {total} tokens "
            f"({num_prompt_tokens} in the {prompt_part}, {max_tokens} in the completion). "
            f"Please reduce the length of the {prompt_part} or of the completion.",
            param,
            "context_length_exceeded",
        )
