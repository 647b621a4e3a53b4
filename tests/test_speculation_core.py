"""Speculative decoding's host side, plain Python: the n-gram index, the adaptive k, and
the scheduler's drafts (budget, blocks, rollback, prefix-cache hashes, look-ahead) under a
fake model that accepts part of each draft."""

from __future__ import annotations

import random

from helpers import check_invariants

from nanovllm_mlx.engine.core.block_manager import BlockManager
from nanovllm_mlx.engine.core.ngram import NgramIndex
from nanovllm_mlx.engine.core.plan import StepResult
from nanovllm_mlx.engine.core.scheduler import Scheduler
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.core.spec_state import INITIAL_RATE
from nanovllm_mlx.engine.core.speculation import MAX_SKIP, Speculator, best_k
from nanovllm_mlx.sampling_params import SamplingParams

BS = 4


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The longest n-gram suffix (max_n down to min_n) found earlier, latest occurrence;
    its continuation, repeated with the period the match implies."""
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for end in range(len(tokens) - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                period = tokens[end + 1 :]
                return (period * k)[:k]
    return []


def test_ngram_index_matches_a_brute_force_search_as_it_grows():
    rng = random.Random(0)
    for trial in range(30):
        min_n, max_n = rng.randint(1, 3), rng.randint(3, 5)
        index = NgramIndex(min_n, max_n)
        tokens = [rng.randrange(6) for _ in range(rng.randint(1, 10))]
        for _ in range(40):
            k = rng.randint(1, 6)
            assert index.propose(tokens, k) == brute_force(tokens, k, min_n, max_n), trial
            tokens += [rng.randrange(6) for _ in range(rng.randint(1, 3))]


def test_ngram_index_prefers_the_longest_match_and_never_matches_itself():
    index = NgramIndex(1, 3)
    assert index.propose([1, 2, 3], 4) == []  # nothing repeats
    assert index.propose([1, 2, 3, 9, 2, 3], 4) == [9, 2, 3, 9]  # "2 3" seen, period 3
    # "9 2 3" (n=3) beats "3" alone, whose latest occurrence is followed by 5.
    index = NgramIndex(1, 3)
    assert index.propose([9, 2, 3, 7, 3, 5, 9, 2, 3], 2) == [7, 3]
    assert NgramIndex(2, 2).propose([4, 4], 3) == []
    assert NgramIndex(1, 1).propose([4, 4], 0) == []


def test_best_k_pays_only_where_acceptance_covers_the_verification():
    assert best_k(0.0, 8) == 0 and best_k(0.05, 8) == 0
    ks = [best_k(r / 20, 8) for r in range(20)]
    assert ks == sorted(ks) and ks[-1] == 8
    assert best_k(0.99, 3) == 3
    # In a step of 32 decodes a draft row costs nearly what it returns.
    assert best_k(0.8, 8, 32, 32) == 0 and best_k(0.95, 8, 32, 32) > 0
    assert best_k(0.7, 8, 8, 8) < best_k(0.7, 8) and best_k(0.7, 8, 8, 500) >= best_k(0.7, 8, 8, 8)


def seq_(seq_id: int, prompt: list[int], max_tokens: int = 30, **kw: object) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return Sequence(seq_id, prompt, params, request_id=str(seq_id))


def test_a_sequence_whose_drafts_fail_backs_off_and_probes():
    spec = Speculator(4, 1, 2)
    seq = seq_(0, [1, 2, 1, 2, 1, 2])
    seq.token_ids.append(1)
    proposals = []
    for _ in range(200):
        draft = spec.propose(seq, 10)
        proposals.append(len(draft))
        if draft:
            spec.record(seq, len(draft), 0)  # never accepted
    # A few full drafts, then probes of one token further and further apart.
    assert proposals[0] == best_k(INITIAL_RATE, 4) >= 2
    assert sum(1 for n in proposals[20:] if n) <= 200 // MAX_SKIP + 2
    assert max(proposals[20:]) == 1
    assert spec.counts.accepted_tokens == 0 and spec.counts.acceptance_rate == 0.0


def test_ineligible_sequences_never_propose():
    spec = Speculator(4, 1, 3)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    fresh = seq_(0, prompt)  # no output token yet: the prompt's own step
    assert spec.propose(fresh, 4) == []
    for kw in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"regex": "a+"}):
        s = seq_(1, prompt, **kw)
        s.token_ids.append(3)
        assert spec.propose(s, 4) == [], kw
    s = seq_(2, prompt)
    s.token_ids.append(3)
    assert spec.propose(s, 10) == [1, 2, 3, 1]  # best_k(INITIAL_RATE, 4): 4, periodic
    assert spec.propose(s, 2) == [1, 2] and spec.propose(s, 0) == []


def simulate(
    seed: int, budget: int, num_blocks: int, look_ahead: bool = False, draft_model: bool = False
) -> Scheduler:
    """Many requests through a scheduler whose fake model accepts each draft token with
    probability 0.7; a sequence ends at max_tokens. Checked every step: block references,
    the tables' length, published hashes against the tokens, and the budget. draft_model:
    drafts come from FakeDrafter, which checks what a draft model's pool would hold."""
    rng = random.Random(seed)
    drafter = FakeDrafter(random.Random(seed + 100)) if draft_model else None
    spec = Speculator(4, 1, 3, frozenset({8}), drafter)
    sched = Scheduler(
        BlockManager(num_blocks, BS), 8, budget, 96, look_ahead=look_ahead, speculator=spec
    )
    for i in range(12):
        unit = [rng.randrange(1, 9) for _ in range(rng.randint(2, 5))]
        prompt = (unit * 8)[: rng.randint(3, 30)]
        sched.add(seq_(i, prompt, max_tokens=rng.randint(1, 40)))
    steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 2000
        plan = sched.schedule()
        decodes = sum(1 for item in plan.batch if item.num_new_tokens == 1 or item.draft)
        drafted = sum(len(item.draft) for item in plan.batch)
        prompts = sum(item.num_new_tokens for item in plan.batch if not item.draft) - decodes
        if drafted:
            assert decodes + drafted + max(prompts, 0) <= max(budget, decodes)
            assert not plan.look_ahead
        tokens = []
        for item in plan.batch:
            for row in range(item.num_rows):
                keep = row < len(item.draft) and rng.random() < 0.7
                tokens.append(item.draft[row] if keep else rng.randrange(1, 9))
        before = {item.seq.seq_id: item.seq.num_output_tokens for item in plan.batch}
        update = sched.update(plan, StepResult(tokens, None))
        assert update.counts is not None
        for seq, count in zip(update.sampled, update.counts):
            assert seq.num_output_tokens == before[seq.seq_id] + count
            assert seq.num_output_tokens <= (seq.params.max_tokens or 0)
            assert seq.num_computed_tokens == seq.num_tokens - 1
            if seq.tokens_left(sched.max_model_len) <= 0:
                sched.finish(seq, "length")
        check_invariants(sched)
        bm = sched.block_manager
        for s in sched.running:
            for i, block_id in enumerate(s.block_table[: len(s.block_hashes)]):
                assert bm.pool.blocks[block_id].token_ids == tuple(
                    s.token_ids[i * BS : (i + 1) * BS]
                )
    assert sched.block_manager.num_free_blocks == num_blocks
    return sched


def test_drafts_keep_blocks_hashes_and_budget_right_under_pressure():
    for seed in range(6):
        roomy = simulate(seed, budget=64, num_blocks=200)
        assert roomy.speculator is not None
        counts = roomy.speculator.counts
        assert 0 < counts.accepted_tokens < counts.draft_tokens
        tight = simulate(seed, budget=8, num_blocks=24)  # preemption and a full budget
        assert tight.num_preemptions > 0 or seed


def test_no_launch_ahead_while_a_sequence_would_propose():
    sched = simulate(0, budget=64, num_blocks=200, look_ahead=True)
    assert sched.speculator is not None and sched.speculator.counts.drafts > 0


def test_drafts_end_before_a_special_token():
    """A special token (EOS, a tool-call marker the detokenizer drops) is only ever the
    drawn token, last of a step's: the server's tool-call parsing relies on that."""
    spec = Speculator(4, 1, 3, special=frozenset({9}))
    s = seq_(0, [1, 2, 3, 9, 5, 1, 2])
    s.token_ids.append(3)
    assert spec.propose(s, 4) == []  # "1 2 3" is followed by the special 9 at once
    s = seq_(1, [1, 2, 3, 4, 9, 1, 2])
    s.token_ids.append(3)
    assert spec.propose(s, 4) == [4]


class FakeDrafter:
    """A draft model's bookkeeping without a model. Its pool is one entry per slot of the
    target's blocks, holding the tokens that K/V would have been computed from (the
    position's prefix); it checks that every position SpecState.drafted claims holds the
    sequence's own prefix in the slot its block table gives now (blocks reused by others
    after a preemption, or rolled back, would not), and that blocks were reserved for its
    draft tokens' slots. It proposes random tokens (8 is special), or nothing while a
    catch-up is cut short."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pool: dict[int, tuple[int, ...]] = {}
        self.asked = 0

    def _write(self, seq: Sequence, tokens: list[int], start: int, end: int) -> None:
        for p in range(start, end):
            self.pool[seq.block_table[p // BS] * BS + p % BS] = tuple(tokens[: p + 1])

    def propose(self, asks: list[tuple[Sequence, int]]) -> list[list[int]]:
        drafts = []
        for seq, k in asks:
            self.asked += 1
            state = seq.spec
            assert state is not None and 1 <= k
            n = seq.num_tokens
            assert state.drafted <= n - 1
            for p in range(state.drafted):
                slot = seq.block_table[p // BS] * BS + p % BS
                assert self.pool.get(slot) == tuple(seq.token_ids[: p + 1]), (seq.seq_id, p)
            assert len(seq.block_table) * BS >= n + k - 1  # slots for its own tokens
            if self.rng.random() < 0.15:  # the catch-up is cut short: no draft this step
                end = self.rng.randint(state.drafted, n - 1)
                self._write(seq, seq.token_ids, state.drafted, end)
                state.drafted = end
                drafts.append([])
                continue
            draft = [self.rng.randrange(1, 10) for _ in range(k)]
            self._write(seq, seq.token_ids + draft, state.drafted, n + k - 1)
            state.drafted = n + k - 1
            drafts.append(draft)
        return drafts


def test_a_draft_models_pool_holds_the_sequences_tokens_where_it_claims_to():
    for seed in range(6):
        roomy = simulate(seed, budget=64, num_blocks=200, draft_model=True)
        assert roomy.speculator is not None and isinstance(roomy.speculator.drafter, FakeDrafter)
        counts = roomy.speculator.counts
        assert roomy.speculator.drafter.asked > 0
        assert 0 < counts.accepted_tokens < counts.draft_tokens
        tight = simulate(seed, budget=8, num_blocks=24, draft_model=True)
        assert tight.num_preemptions > 0 or seed
