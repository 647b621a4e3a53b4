"""A validated request body to what the engine takes: sampling parameters and checks the
engine does not make itself (features this server lacks, stop ids, room in the context).

Range checks stay SamplingParams' and prompt checks the engine's: their InvalidRequestError
names the parameter, and the app's handlers turn it into the 400.
"""

from __future__ import annotations

from nanovllm_mlx.sampling_params import SamplingParams
from nanovllm_mlx.serving.errors import bad_request
from nanovllm_mlx.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
)


def refuse_unsupported(body: GenerationRequest) -> None:
    if body.n is not None and body.n != 1:
        raise bad_request("only n=1 is supported", "n")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request(
            f"response_format type {body.response_format.type!r} is not supported yet: only "
            '{"type": "text"}; structured output (json_object, json_schema) is not available '
            "on this server",
            "response_format",
        )
    unsupported: dict[str, object] = {
        "presence_penalty": body.presence_penalty not in (None, 0, 0.0),
        "frequency_penalty": body.frequency_penalty not in (None, 0, 0.0),
        "logit_bias": bool(body.logit_bias),
    }
    if isinstance(body, CompletionRequest):
        unsupported |= {
            "echo": body.echo,
            "suffix": bool(body.suffix),
            "best_of": body.best_of not in (None, 1),
            "logprobs": body.logprobs not in (None, 0),
        }
    if isinstance(body, ChatCompletionRequest):
        unsupported |= {"tools": bool(body.tools), "top_logprobs": bool(body.top_logprobs)}
    for name, used in unsupported.items():
        if used:
            hint = " (only the sampled token's logprob is available)" if "logprobs" in name else ""
            raise bad_request(f"{name} is not supported by this server{hint}", name)


def sampling_params(
    body: GenerationRequest, max_tokens: int, logprobs: bool
) -> SamplingParams:
    """SamplingParams from the body, OpenAI's defaults where a field is absent."""
    top_k = body.top_k
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM spells "off" as -1
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        max_tokens=max_tokens,
        stop=[] if body.stop is None else body.stop,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )
    return params


def check_room(
    num_prompt_tokens: int, max_tokens: int, max_model_len: int, prompt_part: str, param: str
) -> None:
    """Refuse max_tokens beyond the room the prompt leaves, as vLLM does. A prompt that
    leaves no room at all is the engine's to refuse."""
    total = num_prompt_tokens + max_tokens
    if num_prompt_tokens < max_model_len < total:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens} + {max_tokens} = {total} tokens "
            f"({num_prompt_tokens} in the {prompt_part}, {max_tokens} in the completion). "
            f"Please reduce the length of the {prompt_part} or of the completion.",
            param,
            "context_length_exceeded",
        )
