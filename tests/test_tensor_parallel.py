"""Tensor parallelism: the step records (no MLX), the fused-qkv split, and 2-rank engines
on loopback against the single-process engine, a killed or paused rank, and start-up
mismatches. Engines run in child processes (tests/tp_scenarios.py): MLX keeps one
distributed group per process. Every child has a hard timeout and spawned ranks exit
with their rank 0 (parallel/group.watch_parent)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import REPO_ROOT, SMALL_KV_ARGS, cli_argv, without_blas_notice
from mlx.nn.layers.distributed import shard_linear

from nanovllm_mlx import LLM
from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.parallel.records import STEP, Mirror, Record, Sender, decode, encode
from nanovllm_mlx.sampling_params import SamplingParams

SCENARIOS = Path(__file__).with_name("tp_scenarios.py")
TIMEOUT = 240


def scenario(name: str, model: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run(
        [sys.executable, str(SCENARIOS), name, str(model), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, lines


# Local ranks share the cores -------------------------------------------------------------


def test_local_ranks_split_the_cores_among_their_blas_threads(monkeypatch):
    from nanovllm_mlx import backend
    from nanovllm_mlx.parallel import group

    started, limited = [], []

    class FakePopen:
        def __init__(self, argv, env, **kwargs):
            started.append(env)

    monkeypatch.setattr(group.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(backend, "set_blas_threads", limited.append)
    monkeypatch.setattr(backend, "cpus_each", lambda n: 8 // n)  # an 8-core machine
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    group.spawn(4, "m", {})
    assert limited == [2] and len(started) == 3  # rank 0 here, ranks 1-3 spawned
    assert all(env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2" for env in started)
    # A count the user set is theirs: passed on as it is, and this process left alone.
    started.clear()
    limited.clear()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    group.spawn(2, "m", {})
    assert limited == [] and started[0]["OPENBLAS_NUM_THREADS"] == "3"
    assert "MKL_NUM_THREADS" not in started[0]


def test_the_blas_thread_setter_is_found_for_the_loaded_library():
    from nanovllm_mlx import backend

    if backend.blas_library is None:  # what was loaded decides, not how it is described
        pytest.skip(f"no fast BLAS loaded ({backend.blas_in_use})")
    assert backend._blas_threads  # openblas_set_num_threads or MKL_Set_Num_Threads
    assert backend.cpus_each(1) >= 1 and backend.cpus_each(10**6) == 1


# The step records ---------------------------------------------------------------------------


def test_records_round_trip_and_mirrors_follow_tables_through_preemption():
    """Random steps over a few sequences whose tables grow, get replaced (preemption,
    reallocation) or skip a step; the mirror must rebuild exactly what each step needs."""
    rng = random.Random(0)
    seqs = [
        Sequence(i, [rng.randrange(1000) for _ in range(40)], SamplingParams()) for i in range(5)
    ]
    for s in seqs:
        s.block_table = [rng.randrange(500)]
    sender, mirror = Sender(), Mirror()
    for _ in range(300):
        batch = []
        for s in rng.sample(seqs, rng.randint(1, len(seqs))):
            if rng.random() < 0.15:  # preempted and back with other blocks, from scratch
                s.block_table, s.num_computed_tokens = [rng.randrange(500)], 0
            if rng.random() < 0.3:
                s.block_table.append(rng.randrange(500))
            if s.num_computed_tokens >= s.num_tokens:
                s.token_ids.append(rng.randrange(1000))
            n = rng.randint(1, s.num_tokens - s.num_computed_tokens)
            batch.append(ScheduledSeq(s, n))
        record = decode(encode(sender.record(batch)))
        assert record.kind == STEP
        mirrored = mirror.batch(record)
        for item, copy in zip(batch, mirrored):
            s, m = item.seq, copy.seq
            start = s.num_computed_tokens
            assert m.seq_id == s.seq_id and m.block_table == s.block_table
            assert copy.start == start and copy.num_new_tokens == item.num_new_tokens
            new = slice(start, start + item.num_new_tokens)
            assert m.token_ids[new] == s.token_ids[new] and copy.samples == item.samples
        for item in batch:  # the step ran
            item.seq.num_computed_tokens += item.num_new_tokens
    assert decode(encode(Record(STEP))).entries == []


def test_a_bad_record_is_refused():
    from nanovllm_mlx.parallel.records import ProtocolError

    with pytest.raises(ProtocolError):
        decode([1, 2, 3])
    good = encode(Sender().record([ScheduledSeq(Sequence(7, [1, 2, 3], SamplingParams()), 3)]))
    with pytest.raises(ProtocolError, match="left over"):
        decode(good + [0])


# Sharding -------------------------------------------------------------------------------------


class FakeGroup:
    """What shard_linear asks of a group when it splits weights: its size and rank."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_fused_qkv_is_split_by_heads_within_each_segment():
    embd, heads, n = 8, 4, 2
    layer = nn.Linear(embd, 3 * embd)
    w, b = np.array(layer.weight), np.array(layer.bias)
    x = mx.random.normal((3, embd))
    full = np.array(layer(x)).reshape(3, 3, heads, embd // heads)  # [T, q/k/v, head, d]
    for rank in range(n):
        part = shard_linear(layer, "all-to-sharded", segments=3, group=FakeGroup(rank, n))
        mine = slice(rank * heads // n, (rank + 1) * heads // n)
        want = full[:, :, mine].reshape(3, -1)  # this rank's heads of q, then of k, of v
        np.testing.assert_allclose(np.array(part(x)), want, rtol=1e-5, atol=1e-6)
        rows = np.concatenate(
            [seg[rank * embd // n : (rank + 1) * embd // n] for seg in np.split(w, 3)]
        )
        np.testing.assert_array_equal(np.array(part.weight), rows)
        assert np.array(part.bias).shape == (3 * embd // n,)
    assert b.shape == (3 * embd,)


# Engines on two ranks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, kv_cache_dtype",
    [
        ("gpt2_tiny", "auto"),
        ("llama_tiny", "auto"),
        ("llama_tiny", "int8"),
        ("gpt2_tiny", "int4"),
        ("smollm3_tiny", "auto"),
        ("deepseek_v3_tiny", "auto"),
    ],
)
def test_two_ranks_give_the_tokens_of_one(
    fixture: str, kv_cache_dtype: str, request: pytest.FixtureRequest
):
    # Quantized pools shard like float ones: each rank quantizes its own heads' rows.
    proc, (result,) = scenario("equal", request.getfixturevalue(fixture), kv_cache_dtype)
    assert proc.returncode == 0, proc.stderr
    assert result["equal"], result
    assert result["forks_equal"] and result["prompt_logprobs_close"], result
    # The run had what it must survive: a small pool that preempts, cache hits.
    assert result["blocks"][0] == result["blocks"][1] == 16
    assert result["preemptions"][0] > 0 and result["prefix_hit_tokens"][0] > 0
    assert result["kv_blocks_used"] == 0


def test_speculative_decoding_on_two_ranks_gives_the_tokens_of_one(qwen3_tiny: Path):
    proc, (result,) = scenario("speculative", qwen3_tiny)
    assert proc.returncode == 0, proc.stderr
    assert result["equal"], result
    assert 0 < result["accepted"] < result["proposed"], result
    assert result["kv_blocks_used"] == 0


def test_a_killed_rank_ends_the_run_with_a_clear_error(gpt2_tiny: Path):
    proc, (result,) = scenario("kill", gpt2_tiny)
    assert proc.returncode == 1, proc.stderr
    assert result["error"] == "TensorParallelError"
    assert result["message"] == "tensor-parallel rank 1 was killed by signal 9"


def test_a_paused_rank_ends_the_run_within_the_timeout(gpt2_tiny: Path):
    proc, _ = scenario("pause", gpt2_tiny)  # tp_timeout_s=3
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tensor-parallel ranks stopped answering"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_ranks_that_disagree_are_refused_at_start_up(gpt2_tiny: Path):
    proc, (refusal, exits) = scenario("mismatch", gpt2_tiny)
    assert refusal["error"] == "TensorParallelError", proc.stderr
    assert "rank(s) [1] loaded a different model, options or version" in refusal["message"]
    assert exits == {"worker_exit": [1]}


def test_a_size_that_does_not_divide_the_heads_is_refused(gpt2_tiny: Path):
    code = (
        "import nanovllm_mlx; from nanovllm_mlx import LLM\n"
        f"LLM({str(gpt2_tiny)!r}, kv_cache_gb=0.02, tensor_parallel_size=3)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "ValueError: tensor_parallel_size 3 does not divide the model's attention_heads (4)" in (
        proc.stderr
    )


def test_tensor_parallel_size_is_checked():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM("unused", tensor_parallel_size=0)


def test_an_engine_on_another_rank_is_refused_not_turned_into_a_worker(monkeypatch):
    """Roles are decided at the entry points (LLM, the CLI): LLMEngine's constructor on a
    rank above 0 says so instead of serving steps and never returning."""
    from nanovllm_mlx import LLMEngine
    from nanovllm_mlx.errors import TensorParallelError

    monkeypatch.setenv("MLX_RANK", "1")
    with pytest.raises(TensorParallelError, match="rank 1 of a tensor-parallel group"):
        LLMEngine("unused", tensor_parallel_size=2)


# The command line ------------------------------------------------------------------------------


def run_cli(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    argv = cli_argv(*args)
    if launcher:  # the launcher starts the interpreter itself (its --python)
        argv = [*launcher, *argv[1:]]
    return subprocess.run(
        argv,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_bench_runs_on_two_ranks(gpt2_tiny: Path):
    proc = run_cli(
        "bench", "-m", str(gpt2_tiny), *SMALL_KV_ARGS, "--tensor-parallel-size", "2",
        "--num-seqs", "6", "--min-input", "8", "--max-input", "40", "--min-output", "4",
        "--max-output", "16", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_seqs"] == 6 and result["output_tokens"] > 0


def test_a_size_that_does_not_divide_is_one_error_line_and_leaves_no_rank(gpt2_tiny: Path):
    """Both ranks fail the same check; the user sees rank 0's line alone, not the
    transport's lines about the sockets of the rank that went away."""
    from tp_scenarios import children_of

    argv = cli_argv("ask", "-m", str(gpt2_tiny), *SMALL_KV_ARGS, "-tp", "3", "Hi")
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        spawned: set[int] = set()
        while proc.poll() is None:
            spawned |= set(children_of(proc.pid))
            time.sleep(0.1)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and out == ""
    assert without_blas_notice(err).splitlines() == [
        "error: --tensor-parallel-size 3 does not divide the model's attention_heads (4): "
        "use a size that divides it"
    ], err
    assert spawned, "the ranks were never seen"
    assert not [pid for pid in spawned if Path(f"/proc/{pid}").exists()]  # none left behind


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
def test_under_mlx_launch_every_rank_runs_the_command_and_rank_0_answers(gpt2_tiny: Path):
    args = ["ask", "-m", str(gpt2_tiny), *SMALL_KV_ARGS, "--max-tokens", "10", "Hello there"]
    alone = run_cli(*args)
    assert alone.returncode == 0, alone.stderr
    launch = ["mlx.launch", "--backend", "ring", "-n", "2", "--python", sys.executable]
    proc = run_cli(*args, "-tp", "2", launcher=launch)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(alone.stdout.strip()), proc.stdout


def test_serve_on_two_ranks_answers_then_ends_when_a_rank_dies(gpt2_tiny: Path):
    import httpx
    from tp_scenarios import children_of

    with socket_port() as port:
        argv = cli_argv(
            "serve", "-m", str(gpt2_tiny), *SMALL_KV_ARGS, "-tp", "2", "--port", str(port),
            "--no-live",
        )  # fmt: skip
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
        ok = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        (worker,) = children_of(proc.pid)
        os.kill(worker, signal.SIGKILL)
        failed = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert failed.status_code == 503 and "rank 1 was killed" in failed.text, failed.text
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
        assert (
            err.strip().splitlines()[-1] == "error: tensor-parallel rank 1 was killed by signal 9"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port
