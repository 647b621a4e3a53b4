"""Counters and recent throughput of the engine's steps, for stats() and live views."""

from __future__ import annotations

import time
from collections import deque

from nanovllm_mlx.engine.core.plan import ScheduledSeq

WINDOW_S = 5.0  # prompt/generation tok/s are averaged over the steps of the last 5 s


class StepStats:
    def __init__(self) -> None:
        # (start, end, prompt tokens, sampled tokens) of recent steps
        self._window: deque[tuple[float, float, int, int]] = deque(maxlen=64)
        self.steps = 0  # steps that computed something
        self.batch_sequences = 0  # sum of batch sizes over steps
        self.peak_batch_size = 0
        self.last_batch_size = 0
        self.last_batch_tokens = 0
        self.total_prompt_tokens = 0
        self.total_output_tokens = 0

    def record(self, start: float, batch: list[ScheduledSeq], num_sampled: int) -> None:
        """A step that ran `batch`."""
        tokens = sum(item.num_new_tokens for item in batch)
        # A speculating decode's draft tokens are decode work too.
        decode_tokens = sum(
            1 + len(item.draft) for item in batch if item.start >= item.seq.num_prompt_tokens
        )
        # Prompt tokens include recomputed ones after a preemption: work the step did.
        prompt_tokens = tokens - decode_tokens
        self.steps += 1
        self.batch_sequences += len(batch)
        self.peak_batch_size = max(self.peak_batch_size, len(batch))
        self.last_batch_size = len(batch)
        self.last_batch_tokens = tokens
        self.total_prompt_tokens += prompt_tokens
        self.total_output_tokens += num_sampled
        self._window.append((start, time.perf_counter(), prompt_tokens, num_sampled))

    def snapshot(self) -> dict[str, float]:
        now = time.perf_counter()
        recent = [w for w in self._window if now - w[1] < WINDOW_S]
        busy = sum(end - begin for begin, end, _, _ in recent)
        return {
            "steps": self.steps,
            "batch_sequences": self.batch_sequences,
            "peak_batch_size": self.peak_batch_size,
            "batch_size": self.last_batch_size,
            "batch_tokens": self.last_batch_tokens,
            "prompt_tokens": self.total_prompt_tokens,
            "output_tokens": self.total_output_tokens,
            "prompt_tok_s": sum(w[2] for w in recent) / busy if busy else 0.0,
            "generation_tok_s": sum(w[3] for w in recent) / busy if busy else 0.0,
        }
