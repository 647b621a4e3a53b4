"""What the scheduler decides for a step, as plain records: the modules that prepare, run,
count or mirror a step read these, not the scheduling policy that made them."""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm_mlx.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes, from seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens
