from __future__ import annotations

from dataclasses import dataclass

# Values of kv_cache_dtype (attention/kv_quant.py turns them into pool formats).
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "int8", "int4")
SPECULATIVE_METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 64  # a draft longer than this only grows a step's verify pass
DEFAULT_SPECULATIVE_TOKENS = 4
DEFAULT_LOOKUP = (2, 4)  # prompt_lookup_min, prompt_lookup_max: see README's measurements


@dataclass(slots=True)
class Config:
    """Engine settings; `LLM(model, **kwargs)` takes any of these as keyword arguments."""

    model: str = ""
    dtype: str = "auto"  # auto: float32 on CPU (fast BLAS), the checkpoint's dtype on a GPU
    max_num_seqs: int = 64
    # Most tokens one step computes. None: measured at start-up, what the device prefills
    # in ~0.25 s (engine/runner/budget.py), at most 4096.
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # default: the model's context length
    block_size: int = 16
    kv_cache_gb: float | None = None  # default: derived from the device's memory
    kv_cache_fraction: float = 0.25  # share of device memory the default KV pool may take
    # How the KV pools store K and V: auto (the compute dtype), float16, bfloat16, or int8
    # / int4 quantized per token and head at write time (attention/kv_quant.py). The _k/_v
    # fields override it for one of the two; after __post_init__ they hold what applies.
    kv_cache_dtype: str = "auto"
    kv_cache_dtype_k: str | None = None
    kv_cache_dtype_v: str | None = None
    enable_prefix_caching: bool = True
    # Hybrid models (Qwen3.5): recurrent-state snapshots kept at block boundaries for the
    # prefix cache (engine/core/state_slots.py). None: max_num_seqs; 0: no prefix caching
    # for such a model.
    state_snapshots: int | None = None
    quantize: int | None = None  # 4 or 8: quantize weights with MLX at load time
    quantize_group_size: int = 64
    # Keep quantized checkpoints (GGUF, MLX-quantized) quantized. None: on GPUs, whose
    # quantized kernels are the fast path; on CPU they are dequantized to the compute
    # dtype at load (13x faster prefill for the default 4-bit model on 2 cores).
    keep_quantized: bool | None = None
    seed: int = 0
    # Launch decode step t+1 before reading step t's tokens (see model_runner.py). None:
    # on a GPU only; on a 2-core CPU the overlap slowed decode 14% (29.1 vs 34.7 tok/s).
    async_scheduling: bool | None = None
    # Run all-decode steps through mx.compile, one trace per (batch, table width) bucket
    # (engine/runner/model_runner.py). None: on a GPU, where building a step's graph in Python is
    # a third of a single stream's step; a CPU step is compute-bound and gains nothing.
    compile_decode: bool | None = None
    # Processes that share the model (parallel/): its heads and MLP split across them.
    tensor_parallel_size: int = 1
    # A step that waits longer than this on the other ranks ends the run (a rank is stuck).
    tp_timeout_s: float = 60.0
    # Speculative decoding (engine/core/speculation.py): "ngram" (prompt lookup), "draft"
    # (a smaller model of the same tokenizer, `draft_model`: a path or Hub id as `model`
    # takes; engine/runner/draft_runner.py), or None. num_speculative_tokens: the most
    # tokens a sequence proposes a step (its k adapts below that); prompt_lookup_min/max:
    # the n-gram lengths matched, longest first (vLLM's names; one given, the other
    # defaults to it).
    speculative: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    draft_model: str | None = None

    def __post_init__(self) -> None:
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size")
        for name in positive:
            value = getattr(self, name)
            if value is None and name == "max_num_batched_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 1
        ):
            raise ValueError(
                f"max_model_len must be a positive integer, got {self.max_model_len!r}"
            )
        if self.state_snapshots is not None and (
            isinstance(self.state_snapshots, bool)
            or not isinstance(self.state_snapshots, int)
            or self.state_snapshots < 0
        ):
            raise ValueError(
                f"state_snapshots must be a non-negative integer, got {self.state_snapshots!r}"
            )
        if not self.tp_timeout_s > 0:
            raise ValueError(f"tp_timeout_s must be > 0, got {self.tp_timeout_s!r}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb!r}")
        if not 0 < self.kv_cache_fraction <= 0.95:
            raise ValueError(
                f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"
            )
        for name in ("kv_cache_dtype", "kv_cache_dtype_k", "kv_cache_dtype_v"):
            value = getattr(self, name)
            if value is None and name != "kv_cache_dtype":
                setattr(self, name, self.kv_cache_dtype)
            elif value not in KV_CACHE_DTYPES:
                raise ValueError(
                    f"{name} must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}"
                )
        if self.quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be 4 or 8, got {self.quantize!r}")
        self._check_speculative()
        if self.quantize_group_size not in (32, 64, 128):
            raise ValueError(
                f"quantize_group_size must be 32, 64 or 128, got {self.quantize_group_size}"
            )

    def _check_speculative(self) -> None:
        names = ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")
        if self.speculative is None:
            given = [n for n in names if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{given[0]} needs speculative decoding: set speculative='ngram'")
            if self.draft_model is not None:
                raise ValueError("draft_model needs speculative='draft'")
            return
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be 'ngram' or 'draft', got {self.speculative!r}")
        if self.speculative == "draft":
            self._check_draft()
        elif self.draft_model is not None:
            raise ValueError(f"draft_model needs speculative='draft', not {self.speculative!r}")
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not 1 <= value <= MAX_SPECULATIVE_TOKENS:
                raise ValueError(f"{name} must be in [1, {MAX_SPECULATIVE_TOKENS}], got {value}")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_SPECULATIVE_TOKENS
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None and high is None:
            low, high = DEFAULT_LOOKUP
        low = high if low is None else low
        high = low if high is None else high
        assert low is not None and high is not None
        if low > high:
            raise ValueError(f"prompt_lookup_min ({low}) must be <= prompt_lookup_max ({high})")
        self.prompt_lookup_min, self.prompt_lookup_max = low, high

    def _check_draft(self) -> None:
        if not isinstance(self.draft_model, str) or not self.draft_model:
            raise ValueError(
                "speculative='draft' needs a draft model: give draft_model, a path or Hub id "
                "of a smaller model with the same tokenizer"
            )
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} applies to speculative='ngram', not 'draft'")
        if self.tensor_parallel_size > 1:
            raise ValueError(
                "speculative='draft' does not run under tensor parallelism (the draft model "
                "is not sharded): use speculative='ngram' or tensor_parallel_size=1"
            )
