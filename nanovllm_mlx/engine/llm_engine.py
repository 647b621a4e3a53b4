"""The engine: requests in, one scheduled and computed step at a time, outputs out.

A step, as in nano-vllm: the scheduler picks what to compute, the model runner computes
it and samples, the scheduler advances the sequences, the output processor turns tokens
into text and decides which requests end, and the scheduler retires those. Every caller
(LLM, the CLI, the benchmark, the server's engine thread) drives it through `iterate`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import fields, replace

import mlx.core as mx

from nanovllm_mlx.config import Config
from nanovllm_mlx.engine import memory
from nanovllm_mlx.engine.block_manager import BlockManager
from nanovllm_mlx.engine.budget import PROBE_TOKENS, measure_step_budget
from nanovllm_mlx.engine.isolation import run_isolating
from nanovllm_mlx.engine.model_runner import ModelRunner
from nanovllm_mlx.engine.output_processor import OutputProcessor, RequestOutput
from nanovllm_mlx.engine.scheduler import Scheduler
from nanovllm_mlx.engine.sequence import Sequence
from nanovllm_mlx.engine.stats import StepStats
from nanovllm_mlx.errors import ContextLengthError, EngineStalledError, InvalidRequestError
from nanovllm_mlx.loading import loader
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.sampling_params import SamplingParams

__all__ = ["LLMEngine", "RequestOutput"]


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs: object):
        names = {f.name for f in fields(Config)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(names)}")
        self.config = config = Config(model=model or "", **kwargs)
        mx.random.seed(config.seed)  # unseeded sampling is reproducible per engine
        loaded = loader.load(model, config.dtype, config.quantize, config.quantize_group_size)
        spec = loaded.model.spec
        self.model_name = loaded.name
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        self.vocab_size = spec.vocab_size
        self.max_model_len = min(config.max_model_len or spec.context_length, spec.context_length)
        num_blocks = memory.num_kv_blocks(spec, config, self.dtype, self.max_model_len)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, spec.sliding_window
        )
        self.model_runner = ModelRunner(loaded.model, num_blocks, config.block_size, self.dtype)
        self.max_num_batched_tokens = config.max_num_batched_tokens or measure_step_budget(
            self.model_runner, max(config.max_num_seqs, PROBE_TOKENS), self.max_model_len
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            self.max_num_batched_tokens,
            self.max_model_len,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = mx.default_device() != mx.cpu
        self.step_stats = StepStats()
        self._ids = itertools.count()
        # request id -> outputs not yet taken by the iterate() call that watches it
        self._watched: dict[str, list[RequestOutput]] = {}

    # Requests -----------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Validate and queue a request; bad input raises InvalidRequestError (a ValueError)
        before anything is queued, so it can never disturb the running batch."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be SamplingParams, got {type(params).__name__}"
            )
        params = self._fit_params(params)
        token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(token_ids)} tokens; the model's context is "
                f"{self.max_model_len} (max_model_len), leaving no room to generate"
            )
        seq_id = next(self._ids)
        request_id = str(seq_id) if request_id is None else str(request_id)
        if request_id in self.output_processor:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(seq_id, token_ids, params, request_id=request_id)
        self.output_processor.add(seq)
        self.scheduler.add(seq)
        return request_id

    def add_requests(
        self, prompts: list[str | list[int]], params: list[SamplingParams]
    ) -> list[str]:
        """Queue a batch, all or nothing: on a bad prompt the ones already queued are
        aborted and the error is re-raised with `index` set to the bad prompt's."""
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.add_request(prompt, p))
        except InvalidRequestError as e:
            for request_id in ids:
                self.abort_request(request_id)
            e.index = len(ids)
            raise
        return ids

    def _fit_params(self, params: SamplingParams) -> SamplingParams:
        """What SamplingParams cannot check without the model: token ids against the
        vocabulary, and top_k clamped to it (as vLLM does; a larger k means all tokens)."""
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids {bad[:5]} are not token ids in [0, {self.vocab_size})",
                "stop_token_ids",
            )
        if params.top_k > self.vocab_size:
            params = replace(params, top_k=self.vocab_size)
        return params

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", "prompt")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError(
                f"prompt must be a non-empty string or list of token ids, got {prompt!r}",
                "prompt",
            )
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequestError(
                    f"prompt token {t!r} is not a token id in [0, {self.vocab_size})", "prompt"
                )
        return list(prompt)

    def abort_request(self, request_id: str) -> None:
        """End a request now and free its blocks; a no-op once it has finished. An
        iterate() watching it yields its last output, with finish_reason "abort"."""
        seq = self.output_processor.pop(str(request_id))
        if seq is None:
            return
        self.scheduler.finish(seq, "abort")
        if seq.request_id in self._watched:
            self._watched[seq.request_id].append(self.output_processor.ended_output(seq, "abort"))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # The step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, compute and sample one step; one output per request that sampled."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        look_ahead = self.async_scheduling and self.scheduler.reserve_ahead(batch)
        ran = run_isolating(self.model_runner, batch, look_ahead)
        sampled = self.scheduler.postprocess(ran.batch, ran.tokens)
        self.step_stats.record(start, ran.batch, len(sampled))  # before finish() frees blocks
        outputs, finished = self.output_processor.process(sampled, ran.logprobs)
        for item, error in ran.failed:
            self.output_processor.pop(item.seq.request_id)
            outputs.append(self.output_processor.ended_output(item.seq, "error", error))
            finished.append((item.seq, "error"))
        for seq, reason in finished:
            self.scheduler.finish(seq, reason)
        for out in outputs:
            if out.request_id in self._watched:
                self._watched[out.request_id].append(out)
        return outputs

    def iterate(self, request_ids: Iterable[str] | None = None) -> Iterator[list[RequestOutput]]:
        """Step the engine and yield each step's outputs (a list, maybe empty: a step that
        only prefilled) until the given requests have all finished, or with None until
        the engine has nothing left to do, requests added meanwhile included.

        Every given request ends with exactly one finished output, an abort from anywhere
        included. Closing the iterator early (break, an exception, Ctrl-C) aborts the
        given requests that have not finished. Iterators over disjoint requests may be
        interleaved: each gets its own requests' outputs whichever one stepped.
        """
        if request_ids is None:
            yield from self._iterate_all()
            return
        pending = list(dict.fromkeys(str(r) for r in request_ids))
        for request_id in pending:
            if request_id not in self.output_processor:
                raise InvalidRequestError(f"no unfinished request {request_id!r}")
            if request_id in self._watched:
                raise InvalidRequestError(f"request {request_id!r} is already being iterated")
        mine = list(pending)
        for request_id in mine:
            self._watched[request_id] = []
        try:
            while pending:
                if not any(self._watched[r] for r in pending):
                    steps = self.step_stats.steps
                    self.step()
                    if self.step_stats.steps == steps and not any(
                        self._watched[r] for r in pending
                    ):
                        # Our requests are queued (else an abort output would be here), yet
                        # nothing could be scheduled: report it rather than spin.
                        raise EngineStalledError(
                            f"the engine cannot schedule {len(pending)} queued request(s)"
                        )
                outputs = [out for r in pending for out in self._watched[r]]
                for request_id in pending:
                    self._watched[request_id].clear()
                done = {out.request_id for out in outputs if out.finished}
                pending = [r for r in pending if r not in done]
                yield outputs
        finally:
            for request_id in mine:
                self._watched.pop(request_id, None)
            for request_id in pending:
                self.abort_request(request_id)

    def _iterate_all(self) -> Iterator[list[RequestOutput]]:
        while self.has_unfinished_requests():
            yield self.step()

    # Introspection --------------------------------------------------------------------

    def stats(self) -> dict:
        blocks = self.block_manager.stats()
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": blocks.used,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_cached": blocks.cached,
            "block_size": self.config.block_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "prefix_hit_tokens": blocks.prefix_hit_tokens,
            "prefix_hit_rate": blocks.prefix_hit_rate,
            "preemptions": self.scheduler.num_preemptions,
            "steps_ahead_used": self.model_runner.steps_ahead_used,
            "steps_ahead_dropped": self.model_runner.steps_ahead_dropped,
            **self.step_stats.snapshot(),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
