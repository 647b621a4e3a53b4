"""The engine loop: requests in, one scheduled and computed step at a time, text out."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field, fields

import mlx.core as mx

from nanovllm_mlx import backend
from nanovllm_mlx.config import Config
from nanovllm_mlx.engine.block_manager import BlockManager
from nanovllm_mlx.engine.model_runner import ModelRunner, kv_bytes_per_block
from nanovllm_mlx.engine.scheduler import Scheduler
from nanovllm_mlx.engine.sequence import Sequence
from nanovllm_mlx.loading import loader
from nanovllm_mlx.loading.tokenizer import Tokenizer
from nanovllm_mlx.sampling_params import SamplingParams

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = 1 * GiB


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step: deltas, plus totals for usage reports."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[float] | None = None


@dataclass(slots=True)
class _Request:
    seq: Sequence
    stream: object  # tokenizers.decoders.DecodeStream
    text: str = ""  # decoded so far
    sent: int = 0  # characters of text already returned
    max_stop_len: int = 0
    logprobs: list[float] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs: object):
        names = {f.name for f in fields(Config)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(names)}")
        self.config = config = Config(model=model or "", **kwargs)
        mx.random.seed(config.seed)  # unseeded sampling is reproducible per engine
        loaded = loader.load(model, config.dtype, config.quantize, config.quantize_group_size)
        self.model_name = loaded.name
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        model_len = loaded.model.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        num_blocks = self._num_kv_blocks(loaded)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            self.tokenizer.eos_token_ids,
        )
        self.model_runner = ModelRunner(loaded.model, num_blocks, config.block_size, self.dtype)
        self._async_scheduling = config.async_scheduling
        if self._async_scheduling is None:
            self._async_scheduling = mx.default_device() != mx.cpu
        self.vocab_size = loaded.model.vocab_size
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._window: deque[tuple[float, float, int, int]] = deque(maxlen=64)
        self.last_batch_size = 0
        self.last_batch_tokens = 0
        self.total_prompt_tokens = 0
        self.total_output_tokens = 0

    def _num_kv_blocks(self, loaded: loader.LoadedModel) -> int:
        config = self.config
        per_block = kv_bytes_per_block(loaded.model, config.block_size, self.dtype)
        per_seq = -(-self.max_model_len // config.block_size)
        if config.kv_cache_gb is not None:
            num_blocks = int(config.kv_cache_gb * GiB) // per_block
            if num_blocks < per_seq:
                raise ValueError(
                    f"kv_cache_gb={config.kv_cache_gb} holds {num_blocks} blocks of "
                    f"{config.block_size} tokens, fewer than one {self.max_model_len}-token "
                    f"sequence needs ({per_seq}); raise it or lower max_model_len"
                )
            return num_blocks
        # Enough for every sequence at full length, but no more than a share of memory.
        wanted = per_seq * config.max_num_seqs
        affordable = int(backend.device_memory_bytes() * config.kv_cache_fraction) // per_block
        if mx.default_device() == mx.cpu:
            # The OS zero-fills every page of the pool at start-up (~1 GB/s here: 19 s for
            # 6 GB); a CPU serves few sequences at once, and preemption covers the rest.
            affordable = min(affordable, CPU_DEFAULT_KV_BYTES // per_block)
        return max(per_seq, min(wanted, affordable))

    # Requests -----------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Validate and queue a request; bad input raises ValueError before anything is
        queued, so it can never disturb the running batch."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the model's context is "
                f"{self.max_model_len} (max_model_len), leaving no room to generate"
            )
        seq_id = next(self._ids)
        request_id = str(seq_id) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(seq_id, token_ids, params, request_id=request_id)
        stop_len = max((len(s) for s in params.stop), default=0)
        self._requests[request_id] = _Request(
            seq, self.tokenizer.decode_stream(token_ids), max_stop_len=stop_len
        )
        self.scheduler.add(seq)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(
                f"prompt must be a non-empty string or list of token ids, got {prompt!r}"
            )
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt token {t!r} is not a token id in [0, {self.vocab_size})")
        return list(prompt)

    def abort_request(self, request_id: str) -> None:
        request = self._requests.pop(str(request_id), None)
        if request is not None:
            self.scheduler.finish(request.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # The step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        decode_tokens = sum(
            1 for item in batch if item.seq.num_computed_tokens >= item.seq.num_prompt_tokens
        )
        look_ahead = self._async_scheduling and self.scheduler.reserve_ahead(batch)
        tokens, logprobs = self.model_runner.run(batch, look_ahead)
        sampled = self.scheduler.postprocess(batch, tokens)
        # Prompt tokens include recomputed ones after a preemption: work the step did.
        prompt_tokens = sum(item.num_new_tokens for item in batch) - decode_tokens
        self.last_batch_size = len(batch)
        self.last_batch_tokens = sum(item.num_new_tokens for item in batch)
        self.total_prompt_tokens += prompt_tokens
        self.total_output_tokens += len(sampled)
        self._window.append((start, time.perf_counter(), prompt_tokens, len(sampled)))
        outputs = []
        for i, seq in enumerate(sampled):
            request = self._requests[seq.request_id]
            if logprobs is not None:
                request.logprobs.append(logprobs[i])
            outputs.append(self._output(request))
        return outputs

    def _output(self, request: _Request) -> RequestOutput:
        seq = request.seq
        token = seq.token_ids[-1]
        request.text += request.stream.step(self.tokenizer.tokenizer, token) or ""
        finished = seq.is_finished
        hits = []
        if seq.params.stop:
            # A stop string may straddle tokens: search from before the unsent text.
            start = max(0, request.sent - request.max_stop_len + 1)
            hits = [i for s in seq.params.stop if (i := request.text.find(s, start)) >= 0]
        if hits:
            request.text = request.text[: min(hits)]
            self.scheduler.finish(seq, "stop")
            finished = True
        elif finished:
            # The streaming decoder may still hold bytes of an incomplete character.
            full = self.tokenizer.decode(seq.output_token_ids)
            if full.startswith(request.text):
                request.text = full
        end = len(request.text) if finished else len(request.text) - self._held_back(request)
        delta = request.text[request.sent : end]
        request.sent = max(request.sent, end)
        new_logprobs = None
        if seq.params.logprobs:
            new_logprobs = request.logprobs[-1:]
        if finished:
            self._requests.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            text=delta,
            token_ids=[token],
            finished=finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=new_logprobs,
        )

    @staticmethod
    def _held_back(request: _Request) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        text = request.text
        for n in range(min(request.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in request.seq.params.stop):
                return n
        return 0

    # Introspection --------------------------------------------------------------------

    def stats(self) -> dict:
        blocks = self.block_manager.stats()
        now = time.perf_counter()
        recent = [w for w in self._window if now - w[1] < 5.0]
        busy = sum(end - begin for begin, end, _, _ in recent)
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "batch_size": self.last_batch_size,
            "batch_tokens": self.last_batch_tokens,
            "kv_blocks_used": blocks.used,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_cached": blocks.cached,
            "block_size": self.config.block_size,
            "prefix_hit_tokens": blocks.prefix_hit_tokens,
            "prefix_hit_rate": blocks.prefix_hit_rate,
            "preemptions": self.scheduler.num_preemptions,
            "steps_ahead_used": self.model_runner.steps_ahead_used,
            "steps_ahead_dropped": self.model_runner.steps_ahead_dropped,
            "prompt_tokens": self.total_prompt_tokens,
            "output_tokens": self.total_output_tokens,
            "prompt_tok_s": sum(w[2] for w in recent) / busy if busy else 0.0,
            "generation_tok_s": sum(w[3] for w in recent) / busy if busy else 0.0,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
