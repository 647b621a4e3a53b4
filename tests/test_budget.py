"""The step budget measured at start-up, against a fake device with a known cost."""

from __future__ import annotations

import pytest

from nanovllm_mlx.attention.metadata import PoolLayout
from nanovllm_mlx.engine.runner import budget


class FakeRunner:
    """Prefill of n tokens after c cached ones costs `overhead + n * (per_token + c *
    per_key)` seconds of a fake clock."""

    def __init__(
        self,
        overhead: float,
        per_token: float,
        num_blocks: int = 4096,
        per_key: float = 0.0,
        window: int | None = None,
    ):
        self.pool = PoolLayout(1, num_blocks, 16)
        self.overhead, self.per_token, self.per_key = overhead, per_token, per_key
        self.window = window
        self.now = 0.0
        self.calls: list[int] = []
        self.contexts: list[int] = []

    def run(self, batch, look_ahead: bool = False):
        n, seq = batch[0].num_new_tokens, batch[0].seq
        c = batch[0].start
        assert seq.block_table == list(range(-(-(c + n) // 16))) and seq.num_tokens == c + n
        self.calls.append(n)
        self.contexts.append(c)
        keys = c if self.window is None else min(c, self.window)
        self.now += self.overhead + n * (self.per_token + keys * self.per_key)
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
    got = budget.measure_step_budget(runner, 16, 4096).tokens
    assert got == pytest.approx((budget.TARGET_STEP_S - 0.010) / 0.001, abs=2)
    assert runner.calls[:2] == [budget.PROBE_TOKENS] * 2  # warm-up, then the probe


def test_a_fast_device_gets_the_cap_and_a_very_slow_one_the_floor(fake):
    assert budget.measure_step_budget(fake(0.001, 1e-7), 64, 8192).tokens == budget.DEFAULT_CAP
    very_slow = fake(overhead=0.5, per_token=0.05)
    assert budget.measure_step_budget(very_slow, 64, 8192).tokens == 64
    # No second probe (one small prefill said enough); then the key-cost probe, once on a
    # CPU, twice (the first may build kernels) on a GPU.
    assert very_slow.calls == [16] * 3 and very_slow.contexts == [0, 0, 496]
    slow_gpu = fake(overhead=0.5, per_token=0.05)
    assert budget.measure_step_budget(slow_gpu, 64, 8192, gpu=True).tokens == 64
    assert slow_gpu.calls == [16] * 4 and slow_gpu.contexts == [0, 0, 496, 496]


def test_the_budget_never_exceeds_the_pool(fake):
    small_pool = fake(0.001, 1e-7, num_blocks=20)  # 320 slots
    assert budget.measure_step_budget(small_pool, 16, 8192) == budget.StepBudget(320)


def test_the_probe_stays_inside_the_context(fake):
    # Positions past the context would read garbage embeddings into the KV pool.
    runner = fake(0.001, 1e-6)
    got = budget.measure_step_budget(runner, 16, max_model_len=300)
    assert max(runner.calls) <= 300 and got == budget.StepBudget(budget.DEFAULT_CAP)


def test_a_time_bound_budget_measures_what_cached_keys_cost(fake):
    # A token after c cached keys costs 1 + c / 500 tokens' time: key_cost 0.002.
    runner = fake(overhead=0.0, per_token=0.001, per_key=0.001 / 500)
    got = budget.measure_step_budget(runner, 16, 4096)
    assert got.tokens == 250 and got.key_cost == pytest.approx(0.002, rel=1e-6)
    assert max(c + n for c, n in zip(runner.contexts, runner.calls)) <= budget.KEY_PROBE_CONTEXT
    # A GPU's probe: the larger prefill once more, after KEY_PROBE_KEYS keys (or what the
    # context leaves), twice.
    gpu = fake(overhead=0.0, per_token=0.001, per_key=0.001 / 500)
    got = budget.measure_step_budget(gpu, 16, 4096, gpu=True)
    assert got.tokens == 250 and got.key_cost == pytest.approx(0.002, rel=1e-6)
    assert gpu.contexts[-2:] == [4096 - 250] * 2 and gpu.calls[-2:] == [250] * 2
    # Where the cap binds, a step is short anyway: no key-cost probe, tokens alone.
    fast = fake(0.001, 1e-7, per_key=1e-9)
    assert budget.measure_step_budget(fast, 16, 4096) == budget.StepBudget(budget.DEFAULT_CAP)
    assert set(fast.contexts) == {0}
    # Nor where the context is too short to probe.
    short = fake(0.0, 0.001, per_key=1e-6)
    assert budget.measure_step_budget(short, 16, max_model_len=70).key_cost == 0.0


def test_the_key_cost_is_per_key_a_sliding_window_layer_reads(fake):
    # Every layer slides over 100 keys: the probe after 496 reads 100 per token.
    runner = fake(overhead=0.0, per_token=0.001, per_key=0.001 / 500, window=100)
    got = budget.measure_step_budget(runner, 16, 4096, layer_windows=(100, 100))
    assert got.key_cost == pytest.approx(0.002, rel=1e-6)


def test_a_launch_bound_probe_does_not_take_noise_for_a_key_cost(fake):
    # A GPU's step: 5 ms of launches, 0.1 ms a token, 3e-6 ms a token per cached key (a
    # Llama-3-8B-like ratio), and 1 ms of jitter on every step after cached keys. A 16-token
    # probe after 496 keys would read that jitter as 0.13 tokens a key, 4,000x the truth,
    # and cut a 16k-token prompt's late chunks to a few tokens each.
    runner = fake(overhead=0.005, per_token=1e-4, per_key=3e-9)
    run = runner.run

    def jittery(batch, look_ahead: bool = False):
        runner.now += 0.001 if batch[0].start else 0.0
        return run(batch, look_ahead)

    runner.run = jittery  # type: ignore[method-assign]
    got = budget.measure_step_budget(runner, 16, 32768, gpu=True)
    assert got.tokens == pytest.approx(2450, abs=2)
    assert got.key_cost == pytest.approx(3e-5, rel=0.2)
    # The probe ran the larger prefill's tokens after KEY_PROBE_KEYS keys.
    large = max(runner.calls)
    late = [(c, n) for c, n in zip(runner.contexts, runner.calls) if c]
    assert late and all((c, n) == (budget.KEY_PROBE_KEYS, large) for c, n in late)


def test_the_key_probe_stays_inside_the_context_and_the_pool(fake):
    runner = fake(overhead=0.005, per_token=1e-4, per_key=3e-9, num_blocks=400)  # 6,400 slots
    budget.measure_step_budget(runner, 16, 32768, gpu=True)
    assert max(c + n for c, n in zip(runner.contexts, runner.calls)) == 6400
    runner = fake(overhead=0.005, per_token=1e-4, per_key=3e-9)
    budget.measure_step_budget(runner, 16, 5000, gpu=True)
    assert max(c + n for c, n in zip(runner.contexts, runner.calls)) == 5000


def test_a_fast_cpu_keeps_the_small_key_probe(fake):
    # A CPU's 16 tokens are compute already; a larger prefill after 8,192 keys took 1.9 s
    # on 2 cores (SmolLM2-135M), several times the step it sizes.
    runner = fake(overhead=0.005, per_token=1e-4, per_key=3e-9)
    budget.measure_step_budget(runner, 16, 32768)
    late = [(c, n) for c, n in zip(runner.contexts, runner.calls) if c]
    assert late == [(budget.KEY_PROBE_CONTEXT - budget.PROBE_TOKENS, budget.PROBE_TOKENS)]
