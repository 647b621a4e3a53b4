"""Continuous batching with a fake model: admission, chunking, preemption, retirement.

Which sequences end is the output processor's token rule (token_finish_reason), applied
here as the engine applies it, so these tests need no tokenizer or model."""

from helpers import EOS, check_invariants

from nanovllm_mlx.engine.core.block_manager import BlockManager
from nanovllm_mlx.engine.core.chunk_cost import ChunkCost, keys_read
from nanovllm_mlx.engine.core.plan import StepPlan, StepResult
from nanovllm_mlx.engine.core.scheduler import Scheduler
from nanovllm_mlx.engine.core.sequence import Sequence, SequenceStatus
from nanovllm_mlx.engine.output_processor import token_finish_reason
from nanovllm_mlx.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens_step=64, max_model_len=256):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, max_tokens_step, max_model_len)


def add(sched: Scheduler, n_prompt: int, max_tokens: int = 4, seq_id: int = 0, **kw) -> Sequence:
    s = Sequence(
        seq_id,
        [1 + (seq_id * 7 + i) % 50 for i in range(n_prompt)],
        SamplingParams(max_tokens=max_tokens, **kw),
    )
    sched.add(s)
    return s


def advance(sched: Scheduler, plan: StepPlan, sampled: list[int]) -> None:
    """The step's update, then retire what the engine's finish rule ends."""
    for seq in sched.update(plan, StepResult(sampled, None)).sampled:
        reason = token_finish_reason(seq, {EOS}, sched.max_model_len)
        if reason is not None:
            sched.finish(seq, reason)


def step(sched: Scheduler, token: int = 5):
    plan = sched.schedule()
    advance(sched, plan, [token for item in plan.batch if item.samples])
    return plan.batch


def test_requests_join_and_leave_every_step():
    sched = make()
    a = add(sched, 5, max_tokens=2, seq_id=0)
    batch = step(sched)
    assert [i.seq for i in batch] == [a] and batch[0].num_new_tokens == 5
    b = add(sched, 3, max_tokens=3, seq_id=1)
    batch = step(sched)  # a decodes while b prefills: one mixed step
    assert [(i.seq, i.num_new_tokens) for i in batch] == [(a, 1), (b, 3)]
    assert a.is_finished and a.finish_reason == "length" and a.num_output_tokens == 2
    batch = step(sched)
    assert [i.seq for i in batch] == [b]
    step(sched)
    assert b.is_finished and not sched.has_unfinished()
    check_invariants(sched)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_chunked_prefill_respects_the_token_budget():
    sched = make(max_tokens_step=8)
    a = add(sched, 20, seq_id=0)
    sizes = []
    while not a.num_output_tokens:
        batch = step(sched)
        sizes.append(batch[0].num_new_tokens)
        assert sum(i.num_new_tokens for i in batch) <= 8
    assert sizes == [8, 8, 4]
    assert a.num_computed_tokens == 20


def test_late_prompt_chunks_are_cut_by_the_keys_they_read():
    # key_cost 0.01: a token after 100 cached ones costs 2, after 300 costs 4.
    sched = make(num_blocks=256, max_num_seqs=8, max_tokens_step=40, max_model_len=1024)
    sched.cost.key_cost = 0.01
    d = add(sched, 4, max_tokens=400, seq_id=0)
    step(sched)
    a = add(sched, 500, seq_id=1)
    chunks = []
    while not a.num_output_tokens:
        context = a.num_computed_tokens
        batch = step(sched)
        assert batch[0].seq is d and batch[0].num_new_tokens == 1  # the decode rides along
        n = batch[1].num_new_tokens
        chunks.append((context, n))
        if a.num_computed_tokens < 500:  # a cut chunk fills the budget, rounded down
            assert n == max(1, int(39 / (1 + 0.01 * context)))
        check_invariants(sched)
    assert chunks[:3] == [(0, 39), (39, 28), (67, 23)]
    assert chunks[-1][1] <= 10 and a.num_computed_tokens == 500
    # With no key cost the same prompt goes in equal chunks, as the budget alone allows.
    plain = make(num_blocks=256, max_tokens_step=40, max_model_len=1024)
    b = add(plain, 500, seq_id=2)
    sizes = []
    while not b.num_output_tokens:
        sizes.append(step(plain)[0].num_new_tokens)
    assert sizes == [40] * 12 + [20]


def test_sliding_window_layers_bound_the_keys_a_chunk_pays_for():
    assert keys_read(1000, ()) == 1000
    assert keys_read(1000, (100, 100, None, 100)) == (3 * 100 + 1000) / 4
    assert keys_read(50, (100, None)) == 50
    sched = make(num_blocks=256, max_tokens_step=40, max_model_len=1024)
    sched.cost = ChunkCost(0.01, (100, 100))  # every layer slides
    a = add(sched, 600, seq_id=0)
    sizes = []
    while not a.num_output_tokens:
        sizes.append(step(sched)[0].num_new_tokens)
    assert sizes[:2] == [40, 28] and set(sizes[4:-1]) == {20}  # past the window: 40 / 2


def test_a_prompt_admitted_behind_a_long_one_pays_for_its_padding():
    # A long prompt's last chunk ends with budget left: the next prompt shares the step,
    # and the prefill read pads it to the long one's context, so it is charged that.
    sched = make(num_blocks=256, max_tokens_step=40, max_model_len=1024)
    sched.cost.key_cost = 0.01
    a = add(sched, 299, seq_id=0)
    while a.num_computed_tokens < 294:
        step(sched)
    assert a.num_computed_tokens == 294
    b = add(sched, 30, seq_id=1)
    batch = step(sched)
    # a's last 5 tokens after 294 keys cost 5 * 3.94 = 19.7 of 40; b's tokens are charged
    # 3.94 each too, not 1: 20.3 left buys 5 (alone at no context they would be 20).
    assert [(i.seq, i.num_new_tokens) for i in batch] == [(a, 5), (b, 5)]


def test_a_decode_batch_is_never_cut_by_the_key_cost():
    sched = make(num_blocks=1024, max_num_seqs=8, max_tokens_step=8, max_model_len=1024)
    sched.cost.key_cost = 1.0  # absurd: one cached key costs as much as a token
    seqs = [add(sched, 30, max_tokens=400, seq_id=i) for i in range(8)]
    while not all(s.num_output_tokens for s in seqs):
        decoding = [s for s in sched.running if s.num_output_tokens]
        batch = step(sched)
        assert batch and all(item.num_new_tokens >= 1 for item in batch)  # always progress
        # Every decode rides in every step, before the one prompt chunk (cut to a token).
        assert [i.seq for i in batch if i.num_new_tokens == 1][: len(decoding)] == decoding
        assert sum(i.num_new_tokens > 1 for i in batch) <= 1
    batch = step(sched)
    assert len(batch) == 8 and all(i.num_new_tokens == 1 for i in batch)


def test_decodes_are_scheduled_before_new_prefills_and_budget_is_shared():
    sched = make(max_tokens_step=10)
    a = add(sched, 4, max_tokens=10, seq_id=0)
    step(sched)
    b = add(sched, 30, seq_id=1)
    batch = step(sched)
    assert [(i.seq, i.num_new_tokens) for i in batch] == [(a, 1), (b, 9)]
    assert not batch[1].samples


def test_max_num_seqs_limits_the_running_batch():
    sched = make(max_num_seqs=2)
    seqs = [add(sched, 3, seq_id=i) for i in range(4)]
    step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 2
    while sched.has_unfinished():
        step(sched)
        assert len(sched.running) <= 2
    assert all(s.is_finished for s in seqs)


def test_eos_stop_tokens_and_ignore_eos():
    sched = make()
    a = add(sched, 3, max_tokens=10, seq_id=0)
    b = add(sched, 3, max_tokens=10, seq_id=1, ignore_eos=True)
    c = add(sched, 3, max_tokens=10, seq_id=2, stop_token_ids=[5], ignore_eos=True)
    step(sched, token=EOS)
    assert a.finish_reason == "stop" and not b.is_finished and not c.is_finished
    step(sched, token=5)
    assert c.finish_reason == "stop" and not b.is_finished


def test_sequences_stop_at_max_model_len():
    sched = make(max_model_len=8)
    a = add(sched, 6, max_tokens=100, seq_id=0)
    while sched.has_unfinished():
        step(sched)
    assert a.num_tokens == 8 and a.finish_reason == "length"


def test_out_of_blocks_preempts_the_newest_and_everything_still_finishes():
    # 6 blocks of 4 tokens; three sequences growing to 12 tokens each cannot all fit.
    sched = make(num_blocks=6, block_size=4)
    seqs = [add(sched, 4, max_tokens=8, seq_id=i) for i in range(3)]
    preempted_seen = False
    for _ in range(200):
        if not sched.has_unfinished():
            break
        step(sched)
        check_invariants(sched)
        preempted_seen |= sched.num_preemptions > 0
    assert all(s.is_finished and s.num_output_tokens == 8 for s in seqs)
    assert preempted_seen
    # The oldest request is never the victim while newer ones run.
    assert sched.block_manager.num_free_blocks == 6


def test_preempted_sequence_recomputes_prompt_and_output():
    sched = make(num_blocks=3, block_size=4)
    a = add(sched, 4, max_tokens=6, seq_id=0)
    b = add(sched, 4, max_tokens=6, seq_id=1)
    step(sched)
    step(sched)  # both need a second block: only one is free -> b is preempted
    assert sched.num_preemptions >= 1 and b.status is SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.num_output_tokens == 1
    recomputed = []
    while sched.has_unfinished():
        batch = step(sched)
        recomputed += [i.num_new_tokens for i in batch if i.seq is b and i.num_new_tokens > 1]
    # The recompute covers the prompt and the token generated before the preemption.
    assert recomputed[0] == 5
    assert a.finish_reason == b.finish_reason == "length"


def test_prefix_hits_skip_computation_and_a_full_hit_still_computes_one_token():
    sched = make(block_size=4)
    a = add(sched, 9, max_tokens=1, seq_id=0)
    step(sched)
    assert a.is_finished
    b = Sequence(1, list(a.token_ids[:9]), SamplingParams(max_tokens=1))
    sched.add(b)
    batch = step(sched)
    assert b.num_cached_tokens == 8 and batch[0].num_new_tokens == 1
    c = Sequence(2, list(a.token_ids[:8]), SamplingParams(max_tokens=1))
    sched.add(c)
    batch = step(sched)
    assert c.num_cached_tokens == 4 and batch[0].num_new_tokens == 4


def test_finish_removes_waiting_and_running_requests():
    sched = make(max_num_seqs=1)
    a = add(sched, 3, max_tokens=10, seq_id=0)
    b = add(sched, 3, max_tokens=10, seq_id=1)
    step(sched)
    sched.finish(b, "abort")
    sched.finish(a, "abort")
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_reserve_ahead_only_for_a_steady_decode_batch():
    sched = make(block_size=4)
    a = add(sched, 3, max_tokens=10, seq_id=0)
    b = add(sched, 6, max_tokens=3, seq_id=1)
    batch = step(sched)  # both prefill: nothing to look ahead of
    assert not sched.reserve_ahead(batch)
    plan = sched.schedule()  # both decode; a's next token (position 4) needs a new block
    assert [i.num_new_tokens for i in plan.batch] == [1, 1]
    blocks = len(a.block_table)
    assert sched.reserve_ahead(plan.batch)
    assert len(a.block_table) == blocks + 1 == sched.block_manager.blocks_needed(a.num_tokens + 1)
    advance(sched, plan, [5, 5])
    plan = sched.schedule()  # the reserved block is used, not allocated twice
    assert len(a.block_table) == blocks + 1
    assert not sched.reserve_ahead(plan.batch)  # b samples its last token this step
    advance(sched, plan, [5, 5])
    assert b.is_finished
    add(sched, 2, seq_id=2)
    plan = sched.schedule()
    assert not sched.reserve_ahead(plan.batch)  # a new request joins this step
    advance(sched, plan, [5, 5])
    plan = sched.schedule()
    assert sched.reserve_ahead(plan.batch)
    a.params.repetition_penalty = 1.2  # needs this step's token to sample the next
    assert not sched.reserve_ahead(plan.batch)


def test_reserved_blocks_are_freed_with_the_sequence():
    sched = make(num_blocks=8, block_size=4)
    a = add(sched, 4, max_tokens=10, seq_id=0)
    step(sched)
    plan = sched.schedule()
    assert sched.reserve_ahead(plan.batch)
    advance(sched, plan, [EOS])  # finishes on EOS after the reservation
    assert a.is_finished and sched.block_manager.num_free_blocks == 8
