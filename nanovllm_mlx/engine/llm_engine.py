"""The engine: requests in, one scheduled and computed step at a time, outputs out.

A step, as in vLLM v1: the scheduler plans it (StepPlan), the runner computes it and
samples (StepResult), the scheduler moves the sequences on (StepUpdate), the output
processor turns tokens into text and decides which requests end, and the scheduler
retires those. Every caller (LLM, the CLI, the benchmark, the server's engine thread)
drives it through `iterate`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

import mlx.core as mx

from nanovllm_mlx.engine import requests, setup
from nanovllm_mlx.engine.core.plan import ScheduledSeq, StepUpdate
from nanovllm_mlx.engine.core.scheduler import Scheduler
from nanovllm_mlx.engine.core.speculation import Speculator
from nanovllm_mlx.engine.iteration import Watchers
from nanovllm_mlx.engine.output_processor import OutputProcessor, RequestOutput
from nanovllm_mlx.engine.runner.execute import execute
from nanovllm_mlx.engine.sample import structured
from nanovllm_mlx.engine.stats import StepStats
from nanovllm_mlx.errors import InvalidRequestError
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.sampling_params import SamplingParams

__all__ = ["LLMEngine", "RequestOutput"]


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs: object):
        self.config = config = setup.make_config(model, kwargs)
        parts = setup.build(config)
        spec = parts.loaded.model.spec
        self.model_name = parts.loaded.name
        self.tokenizer: Tokenizer = parts.loaded.tokenizer
        self.dtype = parts.loaded.dtype
        self.quantization = parts.loaded.quantization  # what loading did, in words
        self.vocab_size = spec.vocab_size
        self.max_model_len = parts.max_model_len
        self.parallel = parts.parallel
        self.block_manager = parts.block_manager
        self.model_runner = parts.runner
        k, v = parts.kv_formats
        self.kv_cache_dtype = k.name if k == v else f"k={k.name},v={v.name}"
        self.kv_cache_bytes = parts.kv_bytes
        self.max_num_batched_tokens = parts.budget.tokens
        self.startup_s = parts.startup_s
        self.speculator = None
        self.drafter = parts.drafter  # speculative "draft": the draft model's runner
        if config.speculative is not None:
            assert config.num_speculative_tokens and config.prompt_lookup_min
            assert config.prompt_lookup_max
            self.speculator = Speculator(
                config.num_speculative_tokens,
                config.prompt_lookup_min,
                config.prompt_lookup_max,
                self.tokenizer.special_ids(),
                parts.drafter,
                parts.draft_cost,
            )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            self.max_num_batched_tokens,
            self.max_model_len,
            key_cost=parts.budget.key_cost,
            layer_windows=spec.layer_windows,
            look_ahead=parts.async_scheduling,
            speculator=self.speculator,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.structured = structured.StructuredOutputs(self.tokenizer, self.vocab_size)
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self.step_stats = StepStats()
        self._ids = itertools.count()
        self._watchers = Watchers()

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
        token_ids = requests.tokenize(self.tokenizer, prompt, self.vocab_size)
        params = requests.fit_params(
            params, self.vocab_size, self.config.max_num_seqs, len(token_ids), self.max_model_len
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
        names: list[str | None] = list(request_ids) if request_ids else [None] * len(prompts)
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
        outputs = self._end(str(request_id), "abort")
        self._watchers.deliver(outputs)
        return outputs

    def _end(self, request_id: str, reason: str, error: str | None = None) -> list[RequestOutput]:
        """End every choice of a request now, free their blocks; their last outputs (the
        caller delivers them to the iterators, once)."""
        seqs, outputs = self.output_processor.end(request_id, reason, error)
        for seq in seqs:
            self.scheduler.finish(seq, reason)
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
        """Schedule, compute and sample one step; one output per choice that sampled (or
        ended)."""
        return self._step() or []

    def _step(self) -> list[RequestOutput] | None:
        """One step's outputs, or None when there was nothing to schedule."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.batch:
            return None
        result = execute(self.model_runner, plan)
        update = self.scheduler.update(plan, result)
        sampled = sum(update.counts) if update.counts else len(update.sampled)
        self.step_stats.record(start, update.ran, sampled)
        return self._outputs(update, result.failed)

    def _outputs(
        self, update: StepUpdate, failed: list[tuple[ScheduledSeq, str]]
    ) -> list[RequestOutput]:
        """Text and finish decisions for the sequences that sampled, errors for the
        requests the step failed; retire who ends."""
        outputs, finished = self.output_processor.process(
            update.sampled, update.samples, update.counts
        )
        for item, error in failed:
            outputs += self._end(item.seq.request_id, "error", error)
        for seq, reason in finished:
            self.scheduler.finish(seq, reason)
        self._watchers.deliver(outputs)
        return outputs

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

        yield from self._watchers.iterate(
            [str(r) for r in request_ids],
            self.output_processor.__contains__,
            lambda: self._step() is not None,
            self.abort_request,
        )

    def _iterate_all(self) -> Iterator[list[RequestOutput]]:
        while self.has_unfinished_requests():
            yield self._step() or []

    def close(self) -> None:
        """Release what outlives the object: the other ranks of a tensor-parallel engine
        (otherwise stopped when the process exits)."""
        if self.parallel is not None:
            self.parallel.stop()

    # Introspection --------------------------------------------------------------------

    def _spec_stats(self) -> dict[str, Any]:
        """Speculative decoding's counts (vLLM's spec_decode metrics): drafts verified,
        tokens proposed and accepted, and what a verifying sequence gains a step."""
        if self.speculator is None:
            return {"speculative": None}
        counts = self.speculator.counts
        return {
            "speculative": self.config.speculative,
            "spec_drafts": counts.drafts,
            "spec_draft_tokens": counts.draft_tokens,
            "spec_accepted_tokens": counts.accepted_tokens,
            "spec_acceptance_rate": counts.acceptance_rate,
            "spec_tokens_per_step": counts.tokens_per_step,
            **self._draft_stats(),
        }

    def _draft_stats(self) -> dict[str, Any]:
        """A draft model's forwards and the time they took (part of the steps' time)."""
        if self.drafter is None:
            return {}
        return {
            "spec_draft_model": self.config.draft_model,
            "spec_draft_forwards": self.drafter.forwards,
            "spec_draft_s": self.drafter.seconds,
        }

    def stats(self) -> dict[str, Any]:
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
            # How many tokens the pool holds and in what: quantized K/V fit more of them.
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_cache_tokens": blocks.num_blocks * self.config.block_size,
            "kv_cache_gb": self.kv_cache_bytes / 2**30,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "step_key_cost": self.scheduler.cost.key_cost,
            "startup_s": self.startup_s,
            "prefix_hit_tokens": blocks.prefix_hit_tokens,
            "prefix_hit_rate": blocks.prefix_hit_rate,
            "preemptions": self.scheduler.num_preemptions,
            "steps_ahead_used": self.model_runner.steps_ahead_used,
            "steps_ahead_dropped": self.model_runner.steps_ahead_dropped,
            "compiled_buckets": len(self.model_runner.decode_buckets),
            "compile_decode": self.model_runner.compile_decode,
            **self._spec_stats(),
            "grammar_masks": self.structured.counter.masks,
            "grammar_mask_s": self.structured.counter.seconds,
            **self.step_stats.snapshot(),
            **self._state_stats(),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }

    def _state_stats(self) -> dict[str, Any]:
        """Hybrid models' recurrent-state pool: slots in use, and the snapshots that
        prefix caching restores (0 snapshot slots: prefix caching is off for the model)."""
        states = self.block_manager.states
        if states is None:
            return {}
        st = states.stats()
        return {
            "state_slots_used": st.used,
            "state_slots_total": st.slots,
            "state_snapshots_total": st.snapshots,
            "state_snapshots_cached": st.cached,
            "state_snapshots_restored": st.restored,
        }
