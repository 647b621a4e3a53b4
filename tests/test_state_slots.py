"""The recurrent-state pool's bookkeeping (engine/core/state_slots.py) through the block
manager and the scheduler, plain Python: slots follow sequences through admission,
forks, preemption and the end; snapshots are planned at block boundaries, published only
after their step, evicted least recently used, and never handed out twice."""

from __future__ import annotations

import random

import pytest

from nanovllm_mlx.engine.core.block_manager import BlockManager
from nanovllm_mlx.engine.core.hashing import block_hash
from nanovllm_mlx.engine.core.plan import StepResult
from nanovllm_mlx.engine.core.scheduler import Scheduler
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.engine.core.state_slots import StateSlots
from nanovllm_mlx.sampling_params import SamplingParams

BS = 4


def _seq(i: int, tokens: list[int], n: int = 1) -> Sequence:
    params = SamplingParams(temperature=0.0, max_tokens=64, n=n)
    seq = Sequence(i, tokens, params, request_id=str(i))
    seq.forks = [Sequence(100 + i * 10 + k, tokens, params, index=k) for k in range(1, n)]
    return seq


def _engine(slots: int = 4, snapshots: int = 4, blocks: int = 64, budget: int = 64):
    states = StateSlots(slots, snapshots, BS)
    bm = BlockManager(blocks, BS, True, None, states)
    return Scheduler(bm, slots, budget, 256), states


def _step(sched: Scheduler, token: int = 7):
    plan = sched.schedule()
    samplers = [item for item in plan.batch if item.samples]
    update = sched.update(plan, StepResult([token] * len(samplers), None))
    return plan, update


def test_slots_follow_sequences_and_come_back():
    sched, states = _engine()
    seqs = [_seq(i, list(range(10 * i, 10 * i + 6))) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _step(sched)
    assert sorted(s.state_slot for s in seqs) == [0, 1, 2]
    for s in seqs:
        sched.finish(s, "stop")
    assert all(s.state_slot == -1 for s in seqs)
    assert states.stats().used == 0


def test_admission_waits_for_a_free_slot():
    sched, _ = _engine(slots=2)
    seqs = [_seq(i, [i] * 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    plan, _ = _step(sched)
    assert len(plan.batch) == 2 and seqs[2].state_slot == -1


def test_a_fork_gets_its_own_slot_and_a_copy_of_its_parent():
    sched, states = _engine()
    parent = _seq(0, [1, 2, 3, 4, 5], n=3)
    sched.add(parent)
    plan = sched.schedule()
    from nanovllm_mlx.engine.sample.logprobs import RowSample

    sample = RowSample(0.0, None, forks=[(8, None), (9, None)])
    sched.update(plan, StepResult([7], [sample]))
    children = [s for s in sched.running if s is not parent]
    assert len(children) == 2
    copies = sched.schedule().state_copies
    assert sorted(copies) == sorted((parent.state_slot, c.state_slot) for c in children)
    assert len({parent.state_slot, *(c.state_slot for c in children)}) == 3


def test_a_freed_slot_drops_copies_still_queued_into_it():
    states = StateSlots(3, 0, BS)
    a, b, c = (_seq(i, [i]) for i in range(3))
    states.allocate(a)
    states.fork(a, b)
    states.free(b)  # preempted before the copy was made
    states.allocate(c)  # takes b's slot: the copy must not land on it
    assert states.take_copies() == []


def test_snapshots_are_planned_at_the_boundary_and_published_after_the_step():
    sched, states = _engine(budget=6)
    seq = _seq(0, list(range(1, 12)))  # 11 tokens: boundaries 4 and 8
    sched.add(seq)
    plan = sched.schedule()
    (item,) = plan.batch
    assert item.num_new_tokens == 6 and [s.at for s in item.snapshots] == [4]
    h = block_hash([1, 2, 3, 4], None)
    assert item.snapshots[0].block_hash == h and not states.has_snapshot(h)
    sched.update(plan, StepResult([], None))
    assert states.has_snapshot(h)
    plan, _ = _step(sched)
    assert [s.at for s in plan.batch[0].snapshots] == [2]  # 6 + 2 = block boundary 8


def test_a_failed_entry_returns_its_snapshot_slot():
    sched, states = _engine(snapshots=1)
    seq = _seq(0, list(range(1, 10)))
    sched.add(seq)
    plan = sched.schedule()
    assert plan.batch[0].snapshots
    sched.update(plan, StepResult([], None, failed=[(plan.batch[0], "boom")]))
    assert states.stats().cached == 0
    assert states.reserve(12345) is not None  # the slot is free again


def test_a_hit_is_cut_back_to_its_last_snapshot_and_restored():
    sched, states = _engine(budget=64)
    first = _seq(0, list(range(1, 14)))  # 13 tokens: blocks end at 4, 8, 12
    sched.add(first)
    _step(sched)  # one chunk: a snapshot at 12 only
    sched.finish(first, "stop")
    second = _seq(1, list(range(1, 9)) + [99, 98, 97])  # shares blocks 0-1 (8 tokens)
    sched.add(second)
    plan = sched.schedule()
    assert second.num_computed_tokens == 0  # no state at 8: nothing restorable
    assert [s.at for s in plan.batch[0].snapshots] == [8]  # so snapshot it there
    sched.update(plan, StepResult([5], None))
    third = _seq(2, list(range(1, 9)) + [50, 51])
    sched.add(third)
    plan = sched.schedule()
    assert third.num_computed_tokens == 8
    at_8 = block_hash([5, 6, 7, 8], block_hash([1, 2, 3, 4], None))
    assert plan.state_copies == [(states._snapshots[at_8], third.state_slot)]


def test_decoding_keeps_only_its_newest_snapshot():
    sched, states = _engine(snapshots=8)
    seq = _seq(0, [1, 2, 3])
    sched.add(seq)
    for _ in range(12):  # decodes through boundaries 4, 8, 12
        _step(sched)
    assert states.stats().cached == 1
    assert seq.decode_snapshot is not None and states.has_snapshot(seq.decode_snapshot)


def test_no_snapshot_slots_means_no_hits():
    sched, states = _engine(snapshots=0)
    a = _seq(0, list(range(1, 14)))
    sched.add(a)
    _step(sched)
    sched.finish(a, "stop")
    b = _seq(1, list(range(1, 14)))
    sched.add(b)
    plan = sched.schedule()
    assert b.num_computed_tokens == 0 and not plan.batch[0].snapshots


@pytest.mark.parametrize("seed", range(5))
def test_random_traffic_keeps_every_slot_accounted(seed: int):
    """Admissions, forks, preemptions (a small pool), failures and ends at random: no slot
    is ever held twice, every copy goes between held rows, and all come back."""
    from nanovllm_mlx.engine.sample.logprobs import RowSample

    rng = random.Random(seed)
    sched, states = _engine(slots=6, snapshots=3, blocks=9, budget=9)
    shared = [rng.randrange(50) for _ in range(9)]
    live: list[Sequence] = []
    for step in range(120):
        if rng.random() < 0.3:
            tokens = shared[: rng.randrange(10)] + [rng.randrange(50) for _ in range(3)]
            seq = _seq(step, tokens, n=rng.choice([1, 1, 2]))
            sched.add(seq)
            live.append(seq)
        plan = sched.schedule()
        held = [s.state_slot for s in sched.running]
        assert len(held) == len(set(held)) and -1 not in held
        for src, dst in plan.state_copies:
            assert dst in held and 0 <= src < states.total
        failed = [(plan.batch[0], "x")] if plan.batch and rng.random() < 0.05 else []
        ran = [it for it in plan.batch if it.samples and (it, "x") not in failed]
        samples = [RowSample(0.0, None, forks=[(1, None)] * len(it.seq.forks)) for it in ran]
        sched.update(plan, StepResult([3] * len(ran), samples, failed))
        for item, _ in failed:
            sched.finish(item.seq, "error")
        for s in list(sched.running):
            if s.num_output_tokens >= rng.randrange(1, 24):
                sched.finish(s, "stop")
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s, "abort")
    assert states.stats().used == 0
    cached = states.stats().cached
    assert cached + len(states._free_snapshots) == states.num_snapshots
    # The run went through what it is meant to exercise.
    assert sched.num_preemptions > 0 and states.num_restored > 0
