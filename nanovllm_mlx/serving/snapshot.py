"""The engine's state as the server shows it, published by the engine thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """The engine's state after a step, published for /health, /metrics and the live view
    so that none of them ever waits for a step."""

    time: float  # time.monotonic() when published
    alive: bool
    running: int
    waiting: int  # in the engine's queue, plus handed over and not yet added
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int
    prefix_hit_rate: float
    prompt_tokens: int
    generation_tokens: int
    prompt_tok_s: float
    generation_tok_s: float
    batch_size: int
    peak_batch_size: int
    steps: int
    step_sequences: int
    preemptions: int
    step_failures: int
    requests_finished: int  # ended with a final output (errors included, aborts not)
    requests_failed: int  # ended with finish_reason "error", or failed with their step
    # Sharing: blocks shared and saved now, forked and copied on write so far.
    kv_blocks_shared: int = 0
    kv_blocks_saved: int = 0
    kv_blocks_forked: int = 0
    kv_blocks_copied: int = 0
    kv_cache_tokens: int = 0  # tokens the pool holds (more with a quantized cache)
    # Speculative decoding (0 without it): drafts verified, tokens proposed and accepted.
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_acceptance_rate: float = 0.0  # as the engine's stats() computes them (SpecCounts)
    spec_tokens_per_step: float = 0.0

    @classmethod
    def of(cls, stats: dict[str, Any], **server: Any) -> EngineSnapshot:
        """From engine.stats() and the engine thread's own counters."""
        return cls(
            running=stats["running"],
            waiting=stats["waiting"],
            kv_blocks_used=stats["kv_blocks_used"],
            kv_blocks_total=stats["kv_blocks_total"],
            kv_blocks_cached=stats["kv_blocks_cached"],
            kv_blocks_shared=stats["kv_blocks_shared"],
            kv_blocks_saved=stats["kv_blocks_saved"],
            kv_blocks_forked=stats["kv_blocks_forked"],
            kv_blocks_copied=stats["kv_blocks_copied"],
            kv_cache_tokens=stats["kv_cache_tokens"],
            prefix_hit_rate=stats["prefix_hit_rate"],
            prompt_tokens=stats["prompt_tokens"],
            generation_tokens=stats["output_tokens"],
            prompt_tok_s=stats["prompt_tok_s"],
            generation_tok_s=stats["generation_tok_s"],
            batch_size=stats["batch_size"],
            peak_batch_size=stats["peak_batch_size"],
            steps=stats["steps"],
            step_sequences=stats["batch_sequences"],
            preemptions=stats["preemptions"],
            spec_drafts=stats.get("spec_drafts", 0),
            spec_draft_tokens=stats.get("spec_draft_tokens", 0),
            spec_accepted_tokens=stats.get("spec_accepted_tokens", 0),
            spec_acceptance_rate=stats.get("spec_acceptance_rate", 0.0),
            spec_tokens_per_step=stats.get("spec_tokens_per_step", 0.0),
            **server,
        )
