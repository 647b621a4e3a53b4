"""The engine: requests in, one scheduled and computed step at a time, outputs out.

A step, as in nano-vllm: the scheduler picks what to compute, the model runner computes
it and samples, the scheduler advances the sequences, the output processor turns tokens
into text and decides which requests end, and the scheduler retires those. Every caller
(LLM, the CLI, the benchmark, the server's engine thread) drives it through `iterate`.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import fields

import mlx.core as mx

from nanovllm_mlx.config import Config
from nanovllm_mlx.engine import memory, prompt_logprobs, requests, structured
from nanovllm_mlx.engine.block_manager import BlockManager
from nanovllm_mlx.engine.budget import PROBE_TOKENS, measure_step_budget
from nanovllm_mlx.engine.isolation import StepResult, run_isolating
from nanovllm_mlx.engine.logprobs import RowSample
from nanovllm_mlx.engine.model_runner import ModelRunner
from nanovllm_mlx.engine.output_processor import OutputProcessor, RequestOutput
from nanovllm_mlx.engine.scheduler import Scheduler
from nanovllm_mlx.engine.sequence import Sequence
from nanovllm_mlx.engine.stats import StepStats
from nanovllm_mlx.errors import ContextLengthError, EngineStalledError, InvalidRequestError
from nanovllm_mlx.loading import loader
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.models.base import ModelSpec
from nanovllm_mlx.parallel.group import launched_rank
from nanovllm_mlx.parallel.runner import TensorParallel, fingerprint
from nanovllm_mlx.sampling_params import SamplingParams

__all__ = ["LLMEngine", "RequestOutput"]


def load_model(config: Config) -> loader.LoadedModel:
    return loader.load(
        config.model or None,
        config.dtype,
        config.quantize,
        config.quantize_group_size,
        config.keep_quantized,
    )


def max_model_len(config: Config, spec: ModelSpec) -> int:
    return min(config.max_model_len or spec.context_length, spec.context_length)


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs: object):
        names = {f.name for f in fields(Config)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(names)}")
        self.config = config = Config(model=model or "", **kwargs)
        self.parallel: TensorParallel | None = None
        if config.tensor_parallel_size > 1:
            if (launched := launched_rank()) is not None and launched > 0:
                # Under mlx.launch every process runs the caller's program: this one is
                # one of the other ranks, and serves steps until rank 0 stops.
                from nanovllm_mlx.parallel import worker

                sys.exit(worker.run(model, dict(kwargs)))
            self.parallel = TensorParallel(config)
        mx.random.seed(config.seed)  # unseeded sampling is reproducible per engine
        loaded = load_model(config)
        if self.parallel is not None:
            self.parallel.shard(loaded)
        spec = loaded.model.spec
        self.model_name = loaded.name
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        self.quantization = loaded.quantization  # what loading did, in words
        self.vocab_size = spec.vocab_size
        self.max_model_len = max_model_len(config, spec)
        num_blocks = memory.num_kv_blocks(spec, config, self.dtype, self.max_model_len)
        memory.check_fits(
            num_blocks,
            memory.kv_bytes_per_block(spec, config.block_size, self.dtype),
            loaded.weight_bytes,
            config.block_size,
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        on_gpu = mx.default_device() != mx.cpu
        tp = self.parallel is not None
        runner = ModelRunner(
            loaded.model,
            num_blocks,
            config.block_size,
            self.dtype,
            # Off under tensor parallelism (look-ahead too, below): the other ranks run the
            # eager forward, and their collectives must match rank 0's one for one.
            compile_decode=not tp
            and (on_gpu if config.compile_decode is None else config.compile_decode),
            collective=tp,
        )
        if self.parallel is not None:
            self.parallel.agree(fingerprint(loaded, config, self.max_model_len), num_blocks)
            runner = self.parallel.wrap(runner)
        self.model_runner = runner
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
        self.structured = structured.StructuredOutputs(self.tokenizer, self.vocab_size)
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None or tp:
            self.async_scheduling = on_gpu and not tp
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
        """Validate and queue a request (params.n choices of it, or best_of); bad input
        raises InvalidRequestError (a ValueError) before anything is queued, so it can
        never disturb the running batch."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params = requests.fit_params(params, self.vocab_size, self.config.max_num_seqs)
        token_ids = requests.tokenize(self.tokenizer, prompt, self.vocab_size)
        if len(token_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(token_ids)} tokens; the model's context is "
                f"{self.max_model_len} (max_model_len), leaving no room to generate"
            )
        seq_ids = [next(self._ids) for _ in range(params.num_sequences)]
        request_id = str(seq_ids[0]) if request_id is None else str(request_id)
        if request_id in self.output_processor:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seqs = requests.sequences(
            seq_ids, request_id, token_ids, params, self.structured, self._eos
        )
        self.output_processor.add(seqs)
        self.scheduler.add(seqs[0])
        return request_id

    def add_requests(
        self,
        prompts: list[str | list[int]],
        params: list[SamplingParams],
        request_ids: list[str] | None = None,
    ) -> list[str]:
        """Queue a batch, all or nothing: on a bad prompt the ones already queued are
        aborted and the error is re-raised with `index` set to the bad prompt's."""
        ids: list[str] = []
        names = request_ids or [None] * len(prompts)
        try:
            for prompt, p, name in zip(prompts, params, names, strict=True):
                ids.append(self.add_request(prompt, p, name))
        except InvalidRequestError as e:
            for request_id in ids:
                self.abort_request(request_id)
            e.index = len(ids)
            raise
        return ids

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """End a request now and free its blocks; a no-op once it has finished. Returns
        the last output of each choice it ends (finish_reason "abort"), which an
        iterate() watching it yields too."""
        return self._end(str(request_id), "abort")

    def _end(self, request_id: str, reason: str, error: str | None = None) -> list[RequestOutput]:
        """End every choice of a request now, free their blocks; their last outputs."""
        seqs, outputs = self.output_processor.end(request_id, reason, error)
        for seq in seqs:
            self.scheduler.finish(seq, reason)
        if request_id in self._watched:
            self._watched[request_id] += outputs
        return outputs

    def progress(self, request_id: str) -> tuple[int, int] | None:
        """(prompt tokens computed so far, prompt tokens) of an unfinished request, for
        progress displays during a long prefill; None once it has finished."""
        seq = self.output_processor.sequence(request_id)
        if seq is None:
            return None
        return min(seq.num_computed_tokens, seq.num_prompt_tokens), seq.num_prompt_tokens

    def num_waiting(self) -> int:
        """Sequences queued and not yet admitted to the running batch, every choice of a
        request counted (admission control)."""
        return self.scheduler.num_waiting()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # The step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, compute and sample one step; one output per choice that sampled."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        look_ahead = self.async_scheduling and self.scheduler.reserve_ahead(batch)
        if copies := self.block_manager.take_copies():
            self.model_runner.copy_blocks(copies)
        structured.set_masks(batch)
        to_run, failed = prompt_logprobs.run(self.model_runner, batch)
        computed = [item for item in to_run if item.num_new_tokens]
        ran = (
            run_isolating(self.model_runner, computed, look_ahead)
            if computed
            else StepResult([], [], None)
        )
        passed_only = [item for item in to_run if not item.num_new_tokens]
        sampled = self.scheduler.postprocess(ran.batch + passed_only, ran.tokens)
        samples: list[RowSample | None] | None = ran.logprobs
        sampled, samples = self._fork(sampled, samples)
        structured.advance(sampled)
        failed += ran.failed
        lost = {id(item.seq) for item, _ in failed}
        ran_ok = [item for item in batch if id(item.seq) not in lost]
        self.step_stats.record(start, ran_ok, len(sampled))  # before finish() frees blocks
        outputs, finished = self.output_processor.process(sampled, samples)
        for item, error in failed:
            outputs += self._end(item.seq.request_id, "error", error)
        for seq, reason in finished:
            self.scheduler.finish(seq, reason)
        for out in outputs:
            if out.request_id in self._watched:
                self._watched[out.request_id].append(out)
        return outputs

    def _fork(
        self, sampled: list[Sequence], samples: list[RowSample | None] | None
    ) -> tuple[list[Sequence], list[RowSample | None] | None]:
        """Fork the choices off the requests that sampled their first token: they join
        this step's sampled sequences with the tokens drawn for them."""
        if samples is None:
            return sampled, samples
        sampled, samples = list(sampled), list(samples)
        for seq, sample in list(zip(sampled, samples)):
            if seq.forks and sample is not None:
                tokens = [token for token, _ in sample.forks]
                sampled += self.scheduler.fork(seq, tokens)
                samples += [record for _, record in sample.forks]
        return sampled, samples

    def iterate(self, request_ids: Iterable[str] | None = None) -> Iterator[list[RequestOutput]]:
        """Step the engine and yield each step's outputs (a list, maybe empty: a step that
        only prefilled) until the given requests have all finished, or with None until
        the engine has nothing left to do, requests added meanwhile included.

        Every choice of a given request ends with exactly one finished output, and the
        request with exactly one request_finished output, an abort from anywhere
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
                done = {out.request_id for out in outputs if out.request_finished}
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

    def close(self) -> None:
        """Release what outlives the object: the other ranks of a tensor-parallel engine
        (otherwise stopped when the process exits)."""
        if self.parallel is not None:
            self.parallel.stop()

    # Introspection --------------------------------------------------------------------

    def stats(self) -> dict:
        blocks = self.block_manager.stats()
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": blocks.used,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_cached": blocks.cached,
            "kv_blocks_shared": blocks.shared,
            "kv_blocks_saved": blocks.saved,
            "kv_blocks_forked": blocks.forked,
            "kv_blocks_copied": blocks.copied,
            "block_size": self.config.block_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "prefix_hit_tokens": blocks.prefix_hit_tokens,
            "prefix_hit_rate": blocks.prefix_hit_rate,
            "preemptions": self.scheduler.num_preemptions,
            "steps_ahead_used": self.model_runner.steps_ahead_used,
            "steps_ahead_dropped": self.model_runner.steps_ahead_dropped,
            "compiled_buckets": len(self.model_runner.decode_buckets),
            "grammar_masks": self.structured.masks,
            "grammar_mask_s": self.structured.mask_seconds,
            **self.step_stats.snapshot(),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
