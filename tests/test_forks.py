"""Forked choices (n > 1) in the block manager and scheduler: shared prompt blocks, copy on
write of the partial last block, preemption, prefix caching. Plain Python, no MLX."""

import random

from helpers import EOS, check_invariants

from nanovllm_mlx.engine.core.block_manager import BlockManager, block_hash
from nanovllm_mlx.engine.core.plan import StepResult
from nanovllm_mlx.engine.core.scheduler import Scheduler
from nanovllm_mlx.engine.core.sequence import Sequence, SequenceStatus
from nanovllm_mlx.engine.output_processor import token_finish_reason
from nanovllm_mlx.sampling_params import SamplingParams

BS = 4


def request(
    prompt: list[int], n: int, first_id: int = 0, max_tokens: int = 6, **kw
) -> list[Sequence]:
    """A request's choices as the engine builds them: choice 0 holds the others."""
    params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, **kw)
    seqs = [
        Sequence(first_id + i, prompt, params, request_id=str(first_id), index=i) for i in range(n)
    ]
    seqs[0].forks = seqs[1:]
    return seqs


def make(num_blocks: int = 64, max_num_seqs: int = 16, budget: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget, 256)


def step(sched: Scheduler, rng: random.Random | None = None) -> list[tuple[int, int]]:
    """One engine step with a fake model: forks as the engine does; the copies queued."""
    plan = sched.schedule()
    draw = (lambda: rng.randrange(1, 50)) if rng else (lambda: 7)
    tokens = [draw() for item in plan.batch if item.samples]
    sampled = sched.update(plan, StepResult(tokens, None)).sampled
    for seq in list(sampled):
        if seq.forks:
            sampled += sched.fork(seq, [draw() for _ in seq.forks])
    for seq in sampled:
        reason = token_finish_reason(seq, {EOS}, sched.max_model_len)
        if reason is not None:
            sched.finish(seq, reason)
    check_invariants(sched)
    check_hashes(sched)
    return plan.copies


def check_hashes(sched: Scheduler) -> None:
    """Every hashed block holds what every sequence using it has at that position."""
    bm = sched.block_manager
    for s in sched.running:
        for i, block_id in enumerate(s.block_table[: len(s.block_hashes)]):
            assert bm.pool.blocks[block_id].token_ids == tuple(s.token_ids[i * BS : (i + 1) * BS])


def test_fork_shares_every_prompt_block_and_copies_the_partial_one_on_write():
    sched = make()
    seqs = request(list(range(1, 11)), n=4)  # 10 tokens: 2 full blocks + a partial one
    sched.add(seqs[0])
    assert sched.num_waiting() == 4
    step(sched)  # prefill, then fork
    bm = sched.block_manager
    assert [s.status for s in seqs] == [SequenceStatus.RUNNING] * 4
    assert all(s.block_table == seqs[0].block_table for s in seqs)
    assert all(bm.pool.blocks[b].ref_count == 4 for b in seqs[0].block_table)
    stats = bm.stats()
    assert (stats.used, stats.shared, stats.saved, stats.forked) == (3, 3, 9, 9)
    partial = seqs[0].block_table[2]
    copies = step(sched)  # each writes its second token at position 11: the partial block
    # Three choices copy it; the last one left holding it writes in place.
    assert len(copies) == 3 and len({dst for _, dst in copies}) == 3
    assert {src for src, _ in copies} == {partial}
    tails = {s.block_table[2] for s in seqs}
    assert len(tails) == 4
    assert all(s.block_table[:2] == seqs[0].block_table[:2] for s in seqs)
    stats = bm.stats()
    assert (stats.used, stats.shared, stats.saved, stats.copied) == (6, 2, 6, 3)
    while sched.has_unfinished():
        step(sched)
    assert bm.num_free_blocks == bm.num_blocks and bm.stats().shared == bm.stats().saved == 0


def test_a_block_aligned_prompt_needs_no_copy():
    sched = make()
    seqs = request(list(range(1, 9)), n=3)  # two full blocks
    sched.add(seqs[0])
    step(sched)
    assert step(sched) == []  # position 9 starts a new block of each choice's own
    assert len({s.block_table[2] for s in seqs}) == 3


def test_choices_take_their_slots_in_the_batch_from_admission():
    sched = make(max_num_seqs=5)
    a = request([1, 2, 3], n=4, first_id=0)
    b = request([4, 5, 6], n=2, first_id=10)
    sched.add(a[0])
    sched.add(b[0])
    step(sched)
    # 4 + 2 > 5: b waits although only one sequence ran when it could have been admitted.
    assert len(sched.running) == 4 and list(sched.waiting) == [b[0]]
    while b[0].status is not SequenceStatus.RUNNING:
        step(sched)
    assert all(s.is_finished for s in a)


def test_forked_choices_are_scheduled_right_after_their_parent():
    sched = make(budget=12)
    a = request(list(range(1, 9)), n=3, first_id=0)
    sched.add(a[0])
    long = Sequence(10, list(range(20, 60)), SamplingParams(max_tokens=2), request_id="10")
    sched.add(long)
    step(sched)  # a's whole prompt (8) and 4 tokens of long's
    assert sched.running == [a[0], a[1], a[2], long]
    plan = sched.schedule()
    assert [item.seq for item in plan.batch] == [a[0], a[1], a[2], long]


def test_preempted_choices_recompute_and_everything_frees():
    # 9 blocks of 4: four choices of a 6-token prompt growing to 14 tokens cannot all fit.
    rng = random.Random(1)
    sched = make(num_blocks=9)
    seqs = request(list(range(1, 7)), n=4, max_tokens=8)
    sched.add(seqs[0])
    while sched.has_unfinished():
        step(sched, rng)
    assert sched.num_preemptions > 0
    assert all(s.is_finished and s.num_output_tokens == 8 for s in seqs)
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.stats().saved == 0


def test_prefix_cache_after_forks_hits_the_shared_prompt_blocks_only():
    sched = make()
    seqs = request(list(range(1, 11)), n=2)
    sched.add(seqs[0])
    step(sched)
    step(sched)
    # A new request with the same prompt shares the two full prompt blocks, never a
    # choice's own (copied) third block, whose contents differ by choice.
    again = Sequence(50, list(range(1, 11)), SamplingParams(max_tokens=3), request_id="50")
    sched.add(again)
    step(sched)
    assert again.num_cached_tokens == 8 and again.block_table[:2] == seqs[0].block_table[:2]
    assert again.block_table[2] not in {s.block_table[2] for s in seqs}
    hashes = [block_hash(list(range(1, 5)), None)]
    assert seqs[1].block_hashes[:1] == hashes


def test_aborting_a_request_before_its_fork_ends_every_choice():
    sched = make(budget=4)
    seqs = request(list(range(1, 11)), n=3)
    sched.add(seqs[0])
    step(sched)  # the first chunk only: not forked yet
    assert seqs[0].forks
    sched.finish(seqs[0], "abort")
    assert all(s.is_finished and s.finish_reason == "abort" for s in seqs)
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_no_step_ahead_while_choices_are_to_be_forked():
    sched = make()
    seqs = request([1], n=2)  # a one-token prompt is a "decode" that samples and forks
    sched.add(seqs[0])
    batch = sched.schedule().batch
    assert batch[0].num_new_tokens == 1 and batch[0].samples
    assert not sched.reserve_ahead(batch)


def test_random_forks_keep_every_invariant():
    rng = random.Random(0)
    sched = make(num_blocks=40, max_num_seqs=8, budget=24)
    ids = iter(range(0, 10**6, 100))
    for _ in range(300):
        if rng.random() < 0.3:
            prompt = [rng.randrange(1, 6) for _ in range(rng.randint(1, 14))]
            seqs = request(
                prompt, n=rng.randint(1, 4), first_id=next(ids), max_tokens=rng.randint(1, 9)
            )
            sched.add(seqs[0])
        if sched.running and rng.random() < 0.05:
            sched.finish(rng.choice(sched.running), "abort")
        step(sched, rng)
    while sched.has_unfinished():
        step(sched, rng)
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.stats().shared == bm.stats().saved == 0
