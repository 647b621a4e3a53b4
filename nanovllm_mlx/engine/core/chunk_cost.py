"""What a step's tokens cost of its budget, so that a step's time, not its token count,
is what the budget bounds. Plain Python; the Scheduler spends the budget, the start-up
measures key_cost (engine/runner/budget.py).

A prompt chunk of n tokens costs n * (1 + key_cost * keys), keys being the cached keys
each of its tokens reads (keys_read; those within the chunk are in the budget's own
measurement), and at least the most that an earlier prompt chunk of the step reads: the
matmul path's prefill read (the CPU's) pads every chunk of a step to the widest. (Fused
SDPA reads each chunk on its own, so there this charges a later chunk a little more than
it costs; key_cost is measured, and small, on a GPU.) Measured on 2 CPU cores
(SmolLM2-135M, float32), a 2,000-token prompt prefilled at 150 tok/s at its start and 91
tok/s on average; counting tokens alone, its late chunks made the steps of 8 streams
sharing them twice as long as the early ones (inter-token latency p50 0.72 s, p99 1.13 s).
Decodes always count 1, so the budget's floor keeps every decode batch whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm_mlx.engine.core.sequence import Sequence


def keys_read(context: int, layer_windows: tuple[int | None, ...]) -> float:
    """Cached keys a token after `context` ones reads, averaged over the layers: a
    sliding-window layer reads at most its window."""
    if not layer_windows:
        return float(context)
    return sum(context if w is None else min(context, w) for w in layer_windows) / len(
        layer_windows
    )


@dataclass(slots=True)
class ChunkCost:
    # What each cached key a prompt token attends to adds to its cost, in tokens (0: a
    # step's budget counts tokens alone).
    key_cost: float = 0.0
    # Each layer's sliding window (None: full attention; empty: all full), which bound
    # the keys a token reads.
    layer_windows: tuple[int | None, ...] = ()

    def token(self, seq: Sequence) -> float:
        """What a token of seq costs of the budget now: a prompt token at its context."""
        return 1.0 + self.key_cost * keys_read(seq.num_computed_tokens, self.layer_windows)

    def chunk(self, seq: Sequence, budget: float, widest: float) -> tuple[int, float, float]:
        """The tokens seq computes this step, what they cost of the budget, and the step's
        widest prompt-chunk context after them (`widest`: before them). A chunk cut short
        takes the whole rest of the budget, so nothing is scheduled after it."""
        left = seq.num_tokens - seq.num_computed_tokens
        if left == 1:
            return 1, 1.0, widest
        keys = max(keys_read(seq.num_computed_tokens, self.layer_windows), widest)
        per_token = 1.0 + self.key_cost * keys
        n = max(1, min(left, int(budget / per_token)))
        return n, (n * per_token if n == left else budget), keys
