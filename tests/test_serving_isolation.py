"""One request must never fail everyone: a request the engine fails ends alone (a 500, or an
error event in its stream) while the others in the batch finish normally."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from helpers import MODEL, metrics, serving, wait_for

import nanovllm_mlx.engine.runner.model_runner as model_runner
from nanovllm_mlx.serving.app import create_app

POISON_SEED = 4242
CANARY = {"prompt": "The canary sings", "max_tokens": 48, "temperature": 0, "ignore_eos": True}


def canary_stream(url: str, started: list[int]) -> tuple[str, str | None, int]:
    text, reason = "", None
    body = {**CANARY, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            if event["choices"]:
                started.append(1)
                text += event["choices"][0]["text"]
                reason = event["choices"][0]["finish_reason"] or reason
            else:
                tokens = event["usage"]["completion_tokens"]
    return text, reason, tokens


@pytest.fixture
def served(gpt2_tiny: Path) -> Iterator[tuple[FastAPI, str]]:
    """A fresh server each: a failure injected into one engine stays in its test."""
    app = create_app(str(gpt2_tiny), kv_cache_gb=0.05)
    with serving(app) as url:
        yield app, url


def with_canaries(url: str, attack) -> None:
    """Run attack() while two canary streams are decoding; both must end as if alone."""
    alone = httpx.post(f"{url}/v1/completions", json=CANARY, timeout=60).json()
    started: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        canaries = [pool.submit(canary_stream, url, started) for _ in range(2)]
        assert wait_for(lambda: len(started) >= 2 or any(c.done() for c in canaries))
        attack()
        for canary in canaries:
            assert canary.result(timeout=60) == (alone["choices"][0]["text"], "length", 48)
    assert wait_for(lambda: metrics(url)["nanovllm_kv_blocks_used"] == 0)


def test_top_k_beyond_the_vocabulary_fails_nobody(served: tuple[FastAPI, str]):
    url = served[1]

    def attack() -> None:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "hi", "max_tokens": 4, "top_k": 1_000_000},
            timeout=60,
        )
        assert r.status_code == 200, r.text

    with_canaries(url, attack)
    assert metrics(url)["nanovllm_engine_step_failures_total"] == 0


def test_a_sequence_the_engine_fails_ends_alone(
    served: tuple[FastAPI, str], monkeypatch: pytest.MonkeyPatch
):
    url = served[1]
    # A real fault tied to one sequence, deep in the step: sampling any batch that holds a
    # poisoned request raises once it has 2 tokens. The engine bisects the batch down to it.
    real_sample = model_runner.sample

    def sample(logits, seqs, *args):
        if any(s.params.seed == POISON_SEED and s.num_output_tokens >= 2 for s in seqs):
            raise RuntimeError("injected: this sequence's sampler failed")
        return real_sample(logits, seqs, *args)

    monkeypatch.setattr(model_runner, "sample", sample)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    poison = {"max_tokens": 40, "seed": POISON_SEED, "extra_body": {"ignore_eos": True}}

    def attack() -> None:
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="poison", **poison)
        assert "injected" in info.value.body["message"]
        assert info.value.body["type"] == "server_error"
        with pytest.raises(openai.APIError, match="injected"):
            list(
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True,
                    **poison,
                )
            )  # fmt: skip

    with_canaries(url, attack)
    after = metrics(url)
    assert after['nanovllm_requests_finished_total{finish_reason="error"}'] == 2
    assert after["nanovllm_engine_step_failures_total"] == 0
    assert after["nanovllm_requests_running"] == after["nanovllm_requests_waiting"] == 0
