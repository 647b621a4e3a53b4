"""The step budget measured at start-up, against a fake device with a known cost."""

from __future__ import annotations

import pytest

from nanovllm_mlx.attention.metadata import PoolLayout
from nanovllm_mlx.engine import budget


class FakeRunner:
    """Prefill costs `overhead + tokens * per_token` seconds of a fake clock."""

    def __init__(self, overhead: float, per_token: float, num_blocks: int = 4096):
        self.pool = PoolLayout(1, num_blocks, 16)
        self.overhead, self.per_token = overhead, per_token
        self.now = 0.0
        self.calls: list[int] = []

    def run(self, batch, look_ahead: bool = False):
        n = batch[0].num_new_tokens
        assert batch[0].seq.block_table == list(range(-(-n // 16)))
        self.calls.append(n)
        self.now += self.overhead + n * self.per_token
        return [0], None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def make(*args, **kwargs) -> FakeRunner:
        runner = FakeRunner(*args, **kwargs)
        monkeypatch.setattr(budget.time, "perf_counter", lambda: runner.now)
        return runner

    return make


def test_a_slow_device_gets_what_it_prefills_in_the_target_time(fake):
    runner = fake(overhead=0.010, per_token=0.001)  # 1,000 tok/s, 10 ms a step
    got = budget.measure_step_budget(runner, 16, 4096)
    assert got == pytest.approx((budget.TARGET_STEP_S - 0.010) / 0.001, abs=2)
    assert runner.calls[:2] == [budget.PROBE_TOKENS] * 2  # warm-up, then the probe


def test_a_fast_device_gets_the_cap_and_a_very_slow_one_the_floor(fake):
    assert budget.measure_step_budget(fake(0.001, 1e-7), 64, 8192) == budget.DEFAULT_CAP
    very_slow = fake(overhead=0.5, per_token=0.05)
    assert budget.measure_step_budget(very_slow, 64, 8192) == 64
    assert len(very_slow.calls) == 2  # no second probe: one small prefill said enough


def test_the_budget_never_exceeds_the_pool(fake):
    small_pool = fake(0.001, 1e-7, num_blocks=20)  # 320 slots
    assert budget.measure_step_budget(small_pool, 16, 8192) == 320


def test_the_probe_stays_inside_the_context(fake):
    # Positions past the context would read garbage embeddings into the KV pool.
    runner = fake(0.001, 1e-6)
    got = budget.measure_step_budget(runner, 16, max_model_len=300)
    assert max(runner.calls) <= 300 and got == budget.DEFAULT_CAP
