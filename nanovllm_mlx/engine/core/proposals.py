"""A step's drafts: which decoding entries of a planned batch verify proposed tokens, and
how many, within what the step's budget left, the sequences' length limits and the free
blocks. Plain Python; the scheduler calls it once its batch is planned.

Prompt lookup proposes as it goes, the budget each sequence leaves passing to the next.
A draft model is asked once for the whole batch (one draft forward per draft position
for all of them), so each sequence's k is fixed and its blocks reserved first: the
draft model writes the K/V of its own tokens into the slots those blocks give it
(engine/runner/draft_runner.py), and a shorter draft than asked gives the rest back.
"""

from __future__ import annotations

from collections.abc import Callable

from nanovllm_mlx.engine.core.block_manager import BlockManager
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.core.speculation import Speculator


def assign_drafts(
    batch: list[ScheduledSeq],
    budget: float,
    speculator: Speculator,
    blocks: BlockManager,
    max_model_len: int,
    token_cost: Callable[[Sequence], float],
) -> None:
    """Give decoding entries of `batch` their drafts in place, each within what is left of
    the budget (a draft token costs `token_cost(seq)`: a prompt token at that context), of
    the sequence's length limits (accepted in full, a draft and the token drawn after it
    never pass max_tokens or the context) and of the free blocks; a draft never preempts."""
    sequences = sum(1 for item in batch if item.samples)
    tokens = sum(item.num_new_tokens for item in batch)
    asks: list[tuple[int, Sequence, int]] = []  # a draft model's: (entry, sequence, k)
    for i, item in enumerate(batch):
        seq = item.seq
        if budget < 1:
            break
        if item.num_new_tokens != 1 or not item.samples:
            continue
        per_token = token_cost(seq)
        limit = min(seq.tokens_left(max_model_len) - 1, int(budget / per_token))
        if speculator.drafter is None:
            draft = speculator.propose(seq, limit, sequences, tokens)
            while draft and not _fits(blocks, seq, len(draft)):
                draft.pop()
            if draft:
                blocks.append_slots(seq, seq.num_tokens + len(draft))
                batch[i] = ScheduledSeq(seq, 1 + len(draft), draft=draft, snapshots=item.snapshots)
            budget -= len(draft) * per_token
            continue
        k = speculator.wanted(seq, limit, sequences, tokens)
        while k and not _fits(blocks, seq, k):
            k -= 1
        if k:
            blocks.append_slots(seq, seq.num_tokens + k)
            asks.append((i, seq, k))
            budget -= k * per_token
    if not asks:
        return
    drafts = speculator.draft([(seq, k) for _, seq, k in asks])
    for (i, seq, k), draft in zip(asks, drafts):
        if len(draft) < k:
            blocks.trim(seq, seq.num_tokens + len(draft))
        if draft:
            batch[i] = ScheduledSeq(seq, 1 + len(draft), draft=draft, snapshots=batch[i].snapshots)


def _fits(blocks: BlockManager, seq: Sequence, draft: int) -> bool:
    return blocks.blocks_to_write(seq, seq.num_tokens + draft) <= blocks.num_free_blocks
