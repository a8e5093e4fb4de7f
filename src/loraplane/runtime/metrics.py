"""Prometheus metrics of one runtime process; each server gets its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraplane.api.wire import METRIC_IN_FLIGHT, METRIC_QUEUE_DEPTH, METRIC_REQUESTS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            METRIC_REQUESTS,
            "Requests finished, by adapter and outcome",
            ["adapter", "status"],
            registry=r,
        )
        self.in_flight = Gauge(METRIC_IN_FLIGHT, "Requests accepted and not finished", registry=r)
        self.queue_depth = Gauge(
            METRIC_QUEUE_DEPTH, "Requests waiting for their first forward pass", registry=r
        )
        self.generated = Counter(
            "loraplane_generated_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.prompt = Counter(
            "loraplane_prompt_tokens", "Prompt tokens prefilled", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "loraplane_time_to_first_token_seconds",
            "Arrival to first token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "loraplane_time_per_output_token_seconds",
            "Time between consecutive tokens",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapters = Gauge(
            "loraplane_adapters",
            "Registered adapters by tier (gpu, cpu, disk)",
            ["tier"],
            registry=r,
        )
        self.adapter_load = Histogram(
            "loraplane_adapter_load_seconds",
            "Fetch, verify and read of an adapter",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "loraplane_batch_tokens",
            "Tokens per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )

        self.kv_usage = Gauge(
            "loraplane_kv_cache_usage_ratio",
            "KV-cache blocks held by sequences, of all blocks",
            registry=r,
        )
        self.prefix_queries = Counter(
            "loraplane_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache at admission",
            registry=r,
        )
        self.prefix_hits = Counter(
            "loraplane_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache (not computed again)",
            registry=r,
        )
        self.preemptions = Counter(
            "loraplane_preemptions",
            "Running sequences preempted for KV blocks, to be recomputed",
            registry=r,
        )

    def render(self, tiers: dict[str, int]) -> bytes:
        for tier, count in tiers.items():
            self.adapters.labels(tier=tier).set(count)
        return generate_latest(self.registry)
