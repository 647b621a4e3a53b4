"""Prometheus metrics of one app, in its own CollectorRegistry (several apps in a process,
as in the tests, never share counters).

Engine figures come from the snapshot the engine thread publishes, through a collector that
reads it at scrape time, so a scrape never waits for a step; per-request counters and
histograms are kept on the asyncio side, where requests end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanovllm_mlx.serving.snapshot import EngineSnapshot

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FINISH_REASONS = ("stop", "length", "abort", "error", "timeout")

# (name, help, snapshot field); counters are exposed with the _total suffix.
_GAUGES = (
    ("nanovllm_requests_running", "Sequences in the running batch.", "running"),
    (
        "nanovllm_requests_waiting",
        "Requests waiting for admission to the running batch (what --max-waiting bounds).",
        "waiting",
    ),
    ("nanovllm_kv_blocks_used", "KV cache blocks in use.", "kv_blocks_used"),
    ("nanovllm_kv_blocks_total", "KV cache blocks.", "kv_blocks_total"),
    (
        "nanovllm_kv_cache_tokens",
        "Tokens the KV cache holds (blocks x block size; --kv-cache-dtype sets the bytes each).",
        "kv_cache_tokens",
    ),
    (
        "nanovllm_kv_blocks_cached",
        "Free KV blocks still holding a reusable prefix.",
        "kv_blocks_cached",
    ),
    (
        "nanovllm_kv_blocks_shared",
        "KV blocks held by more than one sequence (forked choices, prefix-cache hits).",
        "kv_blocks_shared",
    ),
    (
        "nanovllm_kv_blocks_saved",
        "KV blocks that sharing saves now: references beyond each shared block's first.",
        "kv_blocks_saved",
    ),
    (
        "nanovllm_prefix_cache_hit_rate",
        "Share of prompt tokens served from the prefix cache.",
        "prefix_hit_rate",
    ),
    ("nanovllm_batch_size", "Sequences in the last engine step.", "batch_size"),
    ("nanovllm_batch_size_peak", "Largest batch the engine has run.", "peak_batch_size"),
    ("nanovllm_engine_up", "1 while the engine thread runs.", "alive"),
    (
        "nanovllm_spec_decode_acceptance_rate",
        "Share of speculated (proposed) tokens accepted, over the engine's life.",
        "spec_acceptance_rate",
    ),
    (
        "nanovllm_spec_decode_tokens_per_step",
        "Mean tokens a speculating sequence gained per verification step (accepted + 1).",
        "spec_tokens_per_step",
    ),
)
_COUNTERS = (
    (
        "nanovllm_prompt_tokens",
        "Prompt tokens computed (prefix-cache hits excluded, recomputation included).",
        "prompt_tokens",
    ),
    ("nanovllm_generation_tokens", "Tokens generated.", "generation_tokens"),
    ("nanovllm_preemptions", "Sequences preempted.", "preemptions"),
    (
        "nanovllm_kv_blocks_forked",
        "KV block references shared by forked choices (n > 1) instead of computed again.",
        "kv_blocks_forked",
    ),
    (
        "nanovllm_kv_blocks_copied",
        "Shared KV blocks copied on write (a forked choice's partial last prompt block).",
        "kv_blocks_copied",
    ),
    (
        "nanovllm_spec_decode_num_drafts",
        "Speculative drafts verified (one per speculating sequence and step).",
        "spec_drafts",
    ),
    ("nanovllm_spec_decode_num_draft_tokens", "Tokens proposed.", "spec_draft_tokens"),
    (
        "nanovllm_spec_decode_num_accepted_tokens",
        "Proposed tokens accepted.",
        "spec_accepted_tokens",
    ),
    ("nanovllm_engine_steps", "Engine steps.", "steps"),
    (
        "nanovllm_engine_step_sequences",
        "Sum of batch sizes over steps (divide by steps for the mean batch size).",
        "step_sequences",
    ),
    (
        "nanovllm_engine_step_failures",
        "Engine steps that raised (their requests got a 500).",
        "step_failures",
    ),
)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        for name, help_, field in _GAUGES:
            yield GaugeMetricFamily(name, help_, value=float(getattr(snap, field)))
        for name, help_, field in _COUNTERS:
            yield CounterMetricFamily(name, help_, value=float(getattr(snap, field)))


class ServingMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot]):
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(snapshot))
        self.finished = Counter(
            "nanovllm_requests_finished",
            "Accepted requests ended, by finish reason (abort: the client left; timeout: "
            "--request-timeout; error: the engine failed the request).",
            ["finish_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.rejected = Counter(
            "nanovllm_requests_rejected",
            "Requests answered with an error before reaching the engine, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nanovllm_request_latency_seconds",
            "Request arrival to last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "nanovllm_time_to_first_token_seconds",
            "Request arrival to first token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "nanovllm_inter_token_latency_seconds",
            "Time between two tokens of a request, as delivered to it.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def total(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def totals(self) -> dict[str, float]:
        """Request counts for the live view: finished by reason, and rejected."""
        counts = {
            r: self.total("nanovllm_requests_finished_total", finish_reason=r)
            for r in FINISH_REASONS
        }
        counts["rejected"] = sum(
            s.value
            for metric in self.rejected.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        )
        return counts
