"""nanovllm-mlx: a small vLLM-style inference engine on MLX."""

from nanovllm_mlx import backend

# Before anything imports mlx: an optimized BLAS must be loaded first to take effect.
backend.load_fast_blas()
backend.keep_freed_memory()

from nanovllm_mlx.engine.llm_engine import LLMEngine, RequestOutput  # noqa: E402
from nanovllm_mlx.llm import LLM  # noqa: E402
from nanovllm_mlx.sampling_params import SamplingParams  # noqa: E402
from nanovllm_mlx.version import __version__ as __version__  # noqa: E402

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
