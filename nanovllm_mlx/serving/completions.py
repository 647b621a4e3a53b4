"""POST /v1/completions: prompts (text or token ids) continued, several per request as one
batch, with logprobs and `echo` (the prompt and its logprobs first: what scoring harnesses
read)."""

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
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    PromptLogprob,
    Usage,
    usage,
)
from nanovllm_mlx.serving.state import ServerState
from nanovllm_mlx.serving.streaming import RendererBase

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# The engine's names for what this endpoint calls logprobs and echo.
RENAMES = {
    "top_logprobs": "logprobs",
    "json_schema": "response_format",
}

Prompt = str | list[int] | list[str] | list[list[int]]


def split_prompts(prompt: Prompt) -> list[str | list[int]]:
    """The request's prompts: a string or token ids, or a list of several."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)  # type: ignore[arg-type]
    return [prompt]  # type: ignore[list-item]


def prompt_ids(prompts: list[str | list[int]], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each prompt. Empty prompts and ids outside the vocabulary are the
    engine's to refuse."""
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


class CompletionRenderer(RendererBase):
    def __init__(
        self,
        *args: object,
        top: int,
        echo: list[tuple[str, list[int]]] | None,
        echo_only: bool,
        prompts: list[list[int]],
        prompt_top: int | None = None,
        **kwargs: object,
    ):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.top = top  # top logprobs per token (logprobs=N)
        self.prompts = prompts
        self.prompt_top = prompt_top  # prompt_logprobs=N
        self.echo = echo  # each prompt's (text, token ids) when echoed
        self.echo_only = echo_only  # max_tokens=0: the prompt alone, nothing generated
        self.offsets: dict[int, int] = {}  # choice -> characters streamed, for text_offset

    def _completion(self, choices: list[CompletionChoice], **extra: object) -> Completion:
        return Completion(**self.answer, choices=choices, **extra)

    def _choice(self, index: int, outputs: list[RequestOutput]) -> CompletionChoice:
        """A choice's part made of outputs (all of it, or a streamed batch)."""
        first_part = index not in self.offsets
        offset = self.offsets.get(index, 0)
        text, tokens, lps, tops = "", [], [], []
        if self.echo is not None and first_part:
            prompt_text, prompt = self.echo[index // self.n]
            text = prompt_text
            entries = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs), None)
            for token, entry in zip(prompt, entries or [None] * len(prompt)):
                tokens.append(token)
                lps.append(None if entry is None else entry.get(token))
                tops.append(None if entry is None else self._top(entry, token))
        if not self.echo_only:
            text += "".join(o.text for o in outputs)
            for o in outputs:
                # No top N (logprobs=0): each token's entry is its own.
                own = [{t: lp} for t, lp in zip(o.token_ids, o.logprobs or [])]
                per_token = o.top_logprobs or own
                tops += [self._top(t, tok) for t, tok in zip(per_token, o.token_ids)]
                tokens += o.token_ids
                lps += o.logprobs or []
        last = outputs[-1]
        logprobs = None
        if self.logprobs:
            texts = [self.token_text(t) for t in tokens]
            starts = []
            for piece in texts:
                starts.append(offset)
                offset += len(piece)
            logprobs = CompletionLogprobs(
                tokens=texts,
                token_logprobs=lps,
                # logprobs=0 too: the sampled token's own entry, as vLLM answers.
                top_logprobs=tops,
                text_offset=starts,
            )
        self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=last.finish_reason if last.finished else None,
            prompt_logprobs=self._prompt_logprobs(index, outputs) if first_part else None,
        )

    def _prompt_logprobs(
        self, index: int, outputs: list[RequestOutput]
    ) -> list[dict[str, PromptLogprob] | None] | None:
        """vLLM's shape: per prompt token, its own entry and the top N, by token id."""
        entries = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs), None)
        if self.prompt_top is None or entries is None:
            return None
        answer: list[dict[str, PromptLogprob] | None] = []
        for token, entry in zip(self.prompts[index // self.n], entries):
            if entry is None:
                answer.append(None)
                continue
            ranked = sorted(entry.items(), key=lambda item: -item[1])
            ranks = {t: r for r, (t, _) in enumerate(ranked, 1)}
            shown = dict(ranked[: self.prompt_top])
            shown[token] = entry[token]
            answer.append(
                {
                    str(t): PromptLogprob(
                        logprob=lp,
                        # The engine keeps the top N and the token: a token below
                        # them ranks N + 1 here, a lower bound.
                        rank=ranks[t],
                        decoded_token=self.token_text(t),
                    )
                    for t, lp in shown.items()
                }
            )
        return answer

    def _top(self, entry: dict[int, float] | None, token: int) -> dict[str, float] | None:
        """OpenAI's legacy top_logprobs: the top N by text, and the chosen token."""
        if entry is None:
            return None
        top: dict[str, float] = {}
        # A prompt position's entry holds its own token first: rank by logprob.
        best = sorted(entry.items(), key=lambda item: -item[1])[: self.top]
        for t, lp in best + [(token, entry.get(token))]:
            if lp is not None:
                top.setdefault(self.token_text(t), lp)
        return top

    def start(self) -> list[Completion]:
        return []

    def deltas(self, batch: list[RequestOutput]) -> list[Completion]:
        chunks = []
        for index, outputs in self.by_choice(batch).items():
            choice = self._choice(index, outputs)
            if choice.text or choice.finish_reason or (self.logprobs and choice.logprobs.tokens):
                chunks.append(self._completion([choice]))
        return chunks

    def usage(self) -> Usage:
        counted = super().usage()
        if not self.echo_only:
            return counted
        return usage(counted.prompt_tokens, 0, counted.prompt_tokens_details.cached_tokens)

    def usage_chunk(self) -> Completion:
        return self._completion([], usage=self.usage())

    def response(self, outputs: list[RequestOutput]) -> Completion:
        groups = self.by_choice(outputs)
        choices = [self._choice(i, [merge_outputs(outs)]) for i, outs in groups.items()]
        return self._completion(choices, usage=self.usage())


async def create_completion(
    body: CompletionRequest, request: Request, state: ServerState
) -> Response:
    state.check_model(body.model)
    refuse_unsupported(body)
    explicit = body.max_tokens
    echo_only = body.echo and explicit == 0  # score the prompt: generate nothing
    top = body.logprobs or 0
    if body.prompt_logprobs is not None and body.prompt_logprobs < 0:
        raise bad_request("prompt_logprobs must be 0-20", "prompt_logprobs")
    echo_top = top if body.echo and body.logprobs is not None else None
    # The engine computes one top N for both views: the larger.
    wanted = [n for n in (echo_top, body.prompt_logprobs) if n is not None]
    try:
        # With echo_only one token is generated, and left out of the answer.
        max_tokens = DEFAULT_MAX_TOKENS if explicit is None else 1 if echo_only else explicit
        params = sampling_params(
            body,
            max_tokens,
            logprobs=body.logprobs is not None,
            top_logprobs=top,
            prompt_logprobs=max(wanted) if wanted else None,
            best_of=body.best_of,
        )
    except InvalidRequestError as e:
        raise invalid_request(e, RENAMES) from None
    prompts = split_prompts(body.prompt)
    # Tokenizing long prompts takes a while: not on the event loop.
    ids = await run_in_threadpool(prompt_ids, prompts, state.tokenizer)
    if explicit is not None:  # else the default, which the engine cuts to each prompt's room
        for p in ids:
            check_room(len(p), max_tokens, state.max_model_len, "prompt", "max_tokens")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    handle = state.handle(request, request_id, len(ids))
    echo = None
    if body.echo:  # as given, or decoded when given as token ids
        texts = [
            p if isinstance(p, str) else state.tokenizer.decode(i) for p, i in zip(prompts, ids)
        ]
        echo = list(zip(texts, ids))
    renderer = CompletionRenderer(
        request_id,
        state.model_name,
        state.token_text,
        body.logprobs is not None,
        handle.engine_ids,
        params.n,
        top=top,
        echo=echo,
        echo_only=echo_only,
        prompts=ids,
        prompt_top=body.prompt_logprobs,
    )
    return await answer(
        handle,
        ids,
        params,
        renderer,
        stream=body.stream,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
        renames=RENAMES,
    )
