"""The Python API: `LLM(model).generate(prompts, params)` and `LLM.stream(...)`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from nanovllm_mlx.engine.llm_engine import LLMEngine
from nanovllm_mlx.engine.output_processor import RequestOutput, merge_outputs
from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.parallel import worker
from nanovllm_mlx.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: object):
        # Under mlx.launch, the other ranks of a tensor-parallel engine serve rank 0's
        # steps here and end the process; only rank 0 goes on to build the engine.
        worker.serve_other_rank(model, kwargs)
        self.engine = LLMEngine(model, **kwargs)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[dict]:
        """Run all prompts as one continuous batch; one result per prompt, in input order.

        A result is a dict: "outputs", one dict per choice (params.n of them) with "text",
        "token_ids", "finish_reason", "error" and, when asked for, "logprobs" and
        "top_logprobs"; choice 0's fields again at the top level (so n=1 reads as
        result["text"]); "num_prompt_tokens", "num_cached_tokens", and "prompt_logprobs"
        when asked for.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    f"{len(params)} sampling params for {len(prompts)} prompts: "
                    "give one, or one each"
                )
        try:
            ids = self.engine.add_requests(prompts, params)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"prompt {e.index}: {e}", e.param, e.code) from e
        outputs: dict[str, dict[int, list[RequestOutput]]] = {i: {} for i in ids}
        for step in self.engine.iterate(ids):
            for out in step:
                outputs[out.request_id].setdefault(out.index, []).append(out)
        return [_result(outputs[i]) for i in ids]

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield text deltas of one prompt as they are generated; closing the generator
        early aborts the request. One choice: for n > 1, iterate the engine (outputs
        carry their choice's index)."""
        if sampling_params is not None and sampling_params.num_sequences > 1:
            raise InvalidRequestError(
                "stream() yields one choice's text: use generate(), or engine.iterate() "
                "whose outputs carry their choice's index, for n > 1",
                "n",
            )
        request_id = self.engine.add_request(prompt, sampling_params)
        for outputs in self.engine.iterate([request_id]):
            for out in outputs:
                if out.text:
                    yield out.text

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] = "auto",
        parallel_tool_calls: bool = True,
        **template_kwargs: Any,
    ) -> dict:
        """One answer to a conversation, through the model's chat template, as generate()'s
        result plus, for each choice (and choice 0 at the top level), the server's parse:
        "content", "reasoning_content" (templates with <think> blocks) and "tool_calls"
        (OpenAI's shape, arguments a JSON string; finish_reason "tool_calls").

        tools (OpenAI's {"type": "function", "function": {...}}) go to the template; history
        messages may hold "tool_calls" and "tool" results. tool_choice "required" or
        {"type": "function", "function": {"name": ...}} constrains decoding to a valid
        call (several with parallel_tool_calls); "none" looks for none.
        template_kwargs: the template's variables (enable_thinking, ...)."""
        from nanovllm_mlx.offline_chat import chat_request, parse_result

        prompt, params, choice_output = chat_request(
            self.tokenizer,
            messages,
            sampling_params,
            tools,
            (tool_choice, parallel_tool_calls),
            template_kwargs,
        )
        return parse_result(self.generate([prompt], params)[0], choice_output, self.tokenizer)

    def stats(self) -> dict:
        return self.engine.stats()


def _result(choices: dict[int, list[RequestOutput]]) -> dict:
    merged = [merge_outputs(choices[i]) for i in sorted(choices)]
    outputs = []
    for out in merged:
        choice: dict = {
            "index": out.index,
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "error": out.error,
        }
        if out.logprobs is not None:
            choice["logprobs"] = out.logprobs
        if out.top_logprobs is not None:
            choice["top_logprobs"] = out.top_logprobs
        outputs.append(choice)
    first = merged[0]
    result = {
        **{k: v for k, v in outputs[0].items() if k != "index"},
        "outputs": outputs,
        "num_prompt_tokens": first.num_prompt_tokens,
        "num_cached_tokens": first.num_cached_tokens,
    }
    if first.prompt_logprobs is not None:
        result["prompt_logprobs"] = first.prompt_logprobs
    return result
