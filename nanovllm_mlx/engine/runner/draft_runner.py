"""The draft model of speculative decoding (Config.speculative "draft"): a second, smaller
model of the target's tokenizer that proposes its greedy tokens, which the target then
verifies in its own step (engine/core/speculation.py keeps the acceptance rule).

Its K/V live in a pool of its own with as many blocks of the same size as the target's,
addressed through the target's block tables: a sequence's draft K/V sit at the same
slots as its target K/V. So the draft needs no allocator of its own, blocks reserved for
a draft are there for the draft model's tokens too, and a rejected tail is simply
written over later (rollback is free). Shared blocks hold the same tokens at the same
positions, so a prefix hit or a fork's shared block gets the same draft K/V whoever
writes it; a sequence that gets a fresh proposer (a fork, a preempted and readmitted
one: Scheduler._preempt) computes its draft K/V again from its start. The cost is
the draft's K/V for every block of the pool, as vLLM sizes a draft model's cache.

Each step, for the sequences that ask (engine/core/proposals.py), the draft catches up
on the tokens its pool does not hold yet (the whole prompt the first time, then the
tokens accepted since), in one forward for all of them that also gives each its first
draft token; then one forward per further draft position, each sequence fed the token
it drew last. A draft model's K/V are only ever a proposal's: a wrong or stale one costs
acceptance, never a token of the output.
"""

from __future__ import annotations

import time
from typing import cast

import mlx.core as mx

from nanovllm_mlx.config import Config
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.runner.model_runner import ModelRunner
from nanovllm_mlx.engine.runner.step_inputs import prepare
from nanovllm_mlx.errors import DraftModelError
from nanovllm_mlx.loading import loader
from nanovllm_mlx.models.base import CausalLM
from nanovllm_mlx.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)


class DraftRunner:
    def __init__(
        self, model: CausalLM, num_blocks: int, block_size: int, dtype: mx.Dtype, catch_up: int
    ):
        self.runner = ModelRunner(model, num_blocks, block_size, dtype)
        self.block_size = block_size
        # Most prompt tokens one step's catch-up computes, over all its sequences: a long
        # prompt's is spread over steps (that sequence proposes once it is done).
        self.catch_up = catch_up
        self.forwards = 0  # draft forwards run
        self.seconds = 0.0  # spent in them, host and device

    def propose(self, asks: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k greedy draft tokens after each (sequence, k), batched (Drafter)."""
        t0 = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in asks]
        left = self.catch_up
        entries: list[tuple[int, ScheduledSeq]] = []
        for r, (seq, _) in enumerate(asks):
            state = seq.spec
            assert state is not None
            # Blocks that left every layer's window (BlockManager.free_out_of_window) have
            # no slots any more: the catch-up starts after them.
            start = max(state.drafted, seq.num_freed_blocks * self.block_size)
            start = min(start, seq.num_tokens - 1)
            n = min(seq.num_tokens - start, max(left, 1))
            left -= n
            entries.append((r, _entry(seq, seq.token_ids, start, n)))
            state.drafted = start + n
        self._forward(entries, drafts)
        for j in range(1, max(k for _, k in asks)):
            entries = []
            for r, (seq, k) in enumerate(asks):
                if len(drafts[r]) == j and k > j:
                    # Position num_tokens + j - 1 holds the token it drew last.
                    tokens = seq.token_ids + drafts[r]
                    entries.append((r, _entry(seq, tokens, len(tokens) - 1, 1)))
                    assert seq.spec is not None
                    seq.spec.drafted = len(tokens)
            if not entries:
                break
            self._forward(entries, drafts)
        self.seconds += time.perf_counter() - t0
        return drafts

    def _forward(self, entries: list[tuple[int, ScheduledSeq]], drafts: list[list[int]]) -> None:
        """One draft forward; each entry that reaches its view's end adds its greedy token
        to drafts[r]."""
        runner = self.runner
        batch = [item for _, item in entries]
        step = prepare(batch, runner.pool, runner.backend, None, runner.windows, None)
        logits = runner.forward(step)
        self.forwards += 1
        if logits is None:
            mx.eval(runner.cache_arrays())
            return
        tokens = mx.argmax(logits, axis=-1)
        mx.eval(tokens, runner.cache_arrays())
        rows = {id(item): r for r, item in entries}
        for item, token in zip(step.samplers, cast(list[int], tokens.tolist())):
            drafts[rows[id(item)]].append(token)


def _entry(seq: Sequence, tokens: list[int], start: int, n: int) -> ScheduledSeq:
    """n tokens of `tokens` (seq's, and the draft's so far) from `start`, written into
    seq's blocks; sampled where they reach the end of `tokens`."""
    view = Sequence(seq.seq_id, tokens, _GREEDY)
    view.block_table = seq.block_table
    return ScheduledSeq(view, n, start=start)


def load_draft(config: Config, target: loader.LoadedModel, context: int) -> loader.LoadedModel:
    """The draft model, loaded as the target was; refused (DraftModelError) unless it
    speaks the target's tokenizer, its vocabulary size included, covers the context, and
    keeps no recurrent state (a rejected draft could not be rolled back from it)."""
    assert config.draft_model
    options = loader.LoadOptions(
        config.dtype, config.quantize, config.quantize_group_size, config.keep_quantized
    )
    draft = loader.load(config.draft_model, options)
    spec, want = draft.model.spec, target.model.spec
    fix = f"use a draft model of {target.name}'s tokenizer family"
    if spec.vocab_size != want.vocab_size:
        raise DraftModelError(
            f"draft model {draft.name} has a vocabulary of {spec.vocab_size:,} tokens, "
            f"{target.name} of {want.vocab_size:,}: {fix}"
        )
    mine = draft.tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    theirs = target.tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    if mine != theirs:
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise DraftModelError(
            f"draft model {draft.name}'s tokenizer differs from {target.name}'s "
            f"({differ:,} token-id pairs not in both): {fix}"
        )
    if spec.state_layers:
        raise DraftModelError(
            f"draft model {draft.name} keeps a recurrent state, which a rejected draft "
            "cannot be rolled back from: use a transformer draft model"
        )
    if spec.context_length < context:
        raise DraftModelError(
            f"draft model {draft.name} serves {spec.context_length:,} positions, fewer than "
            f"max_model_len {context:,}: lower --max-model-len or use another draft model"
        )
    return draft
