"""A request as the engine takes it: its prompt's token ids, its parameters checked
against the model, and one Sequence per choice."""

from __future__ import annotations

from dataclasses import replace

from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.sample.structured import StructuredOutputs
from nanovllm_mlx.errors import ContextLengthError, InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.sampling_params import SEED_RANGE, SamplingParams


def room(num_tokens: int, max_model_len: int) -> int:
    """The tokens the context leaves after num_tokens: the one place it is computed."""
    return max_model_len - num_tokens


def fit_params(
    params: SamplingParams,
    vocab_size: int,
    max_num_seqs: int,
    num_prompt_tokens: int,
    max_model_len: int,
) -> SamplingParams:
    """What SamplingParams cannot check without the model and the prompt: token ids
    against the vocabulary, top_k clamped to it (as vLLM does; a larger k means all
    tokens), the choices against the batch they must fit in together, and max_tokens
    resolved against the context: None is the rest of it, and more than the rest is cut
    to it (generation would stop there anyway), min_tokens with it. A prompt that leaves
    no room is refused."""
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{name} {bad[:5]} are not token ids in [0, {vocab_size})", name
            )
    if params.num_sequences > max_num_seqs:
        name = "best_of" if params.best_of else "n"
        raise InvalidRequestError(
            f"{name}={params.num_sequences} choices cannot run together in a batch of at most "
            f"{max_num_seqs} sequences (the engine's max_num_seqs)",
            name,
        )
    if params.top_k > vocab_size:
        params = replace(params, top_k=vocab_size)
    left = room(num_prompt_tokens, max_model_len)
    if left <= 0:
        raise ContextLengthError(
            f"prompt has {num_prompt_tokens} tokens; the model's context is "
            f"{max_model_len} (max_model_len), leaving no room to generate"
        )
    if params.max_tokens is None or params.max_tokens > left:
        params = replace(params, max_tokens=left, min_tokens=min(params.min_tokens, left))
    return params


def tokenize(tokenizer: Tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty", "prompt")
        try:
            return tokenizer.encode(prompt)
        except TypeError as e:  # lone surrogates: bytes that were never UTF-8
            message = f"prompt is not valid Unicode text ({e})"
            raise InvalidRequestError(message, "prompt") from None
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InvalidRequestError(
            f"prompt must be a non-empty string or list of token ids, got {prompt!r}",
            "prompt",
        )
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequestError(
                f"prompt token {t!r} is not a token id in [0, {vocab_size})", "prompt"
            )
    return list(prompt)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice index's parameters: seed + index, so that choice i of a request with seed s
    draws exactly as a request of its own with seed s + i would (wrapping within the 64
    bits a seed has, which keeps the draw: it uses the low 63 bits)."""
    if index == 0 or params.seed is None:
        return params
    seed = params.seed + index
    if seed > SEED_RANGE[1]:
        seed -= 2**64
    return replace(params, seed=seed)


def sequences(
    seq_ids: list[int],
    request_id: str,
    token_ids: list[int],
    params: SamplingParams,
    structured: StructuredOutputs,
    eos_token_ids: frozenset[int],
) -> list[Sequence]:
    """The request's choices, choice 0 holding the others as forks until its prompt is
    computed. Raises InvalidRequestError when its grammar does not compile."""
    count = len(seq_ids)
    constraints = structured.constraints(params, count)
    seqs = [
        Sequence(
            seq_ids[i],
            token_ids,
            choice_params(params, i),
            request_id=request_id,
            index=i,
            eos_token_ids=eos_token_ids,
            constraint=None if constraints is None else constraints[i],
        )
        for i in range(count)
    ]
    seqs[0].forks = seqs[1:]
    return seqs
