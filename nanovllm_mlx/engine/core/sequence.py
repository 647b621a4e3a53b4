from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

from nanovllm_mlx.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm_mlx.engine.core.spec_state import SpecState
    from nanovllm_mlx.engine.sample.constraint import Constraint


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    """One choice of a request: its tokens and its place in the KV cache.

    Tokens [0, num_computed_tokens) have their K/V in the cache. A sequence samples a new
    token in the step whose chunk brings num_computed_tokens up to num_tokens.

    A request with n > 1 choices is one sequence (choice 0) that holds the others in
    `forks` until its prompt is computed; they are forked off it in the step that samples
    its first token, sharing its blocks (Scheduler.fork).
    """

    seq_id: int
    token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    # Leading block-table entries freed because they left every layer's sliding window.
    num_freed_blocks: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    index: int = 0  # which choice of its request
    eos_token_ids: frozenset[int] = frozenset()  # the model's, for min_tokens
    forks: list[Sequence] = field(default_factory=list)  # choices 1.. not yet forked off
    constraint: Constraint | None = None  # structured output: the grammar's state
    token_mask: Any = None  # this step's allowed tokens (numpy bitmask) when constrained
    # Prompt logprobs are computed by a pass that needs every prompt token's logits, so
    # no prefix-cache hit may skip them until that pass is done.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprobs_pending: bool = False
    # Hybrid models: this sequence's row in the recurrent-state pool (-1: none), and the
    # block hash of the snapshot its decoding last published (engine/core/state_slots.py).
    state_slot: int = -1
    decode_snapshot: int | None = None
    # Where a prefix that the KV cache shares with an earlier prompt ends, past the last
    # snapshot of it (0: none): snapshotted when this sequence computes it.
    state_mark: int = 0
    spec: SpecState | None = None  # its proposer, once it speculates (engine/core/speculation.py)

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * self.num_prompt_tokens
            self.prompt_logprobs_pending = self.num_prompt_tokens > 1

    @property
    def width(self) -> int:
        """Running slots this sequence takes once its forks are forked off."""
        return 1 + len(self.forks)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def tokens_left(self, max_model_len: int) -> int:
        """How many more tokens this sequence may sample: the one place the length limits
        (max_tokens, and the context) are applied."""
        max_tokens = self.params.max_tokens
        assert max_tokens is not None, "LLMEngine resolves max_tokens=None (fit_params)"
        return min(max_tokens - self.num_output_tokens, max_model_len - self.num_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
