"""Prometheus metrics of one server instance (its own registry, no process-wide state)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Seconds; decode on a CPU ranges from milliseconds (tiny models) to seconds (full size).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, engine_metrics: Callable[[], dict], queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("dsv4_requests", "Chat completion requests by final status",
                                ["status"], registry=self.registry)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("dsv4_completion_tokens", "Tokens generated",
                                         registry=self.registry)
        self.cached_tokens = Counter("dsv4_prompt_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                     registry=self.registry)
        self.time_to_first_token = Histogram("dsv4_time_to_first_token_seconds", "Time to first token",
                                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("dsv4_inter_token_seconds", "Time between streamed tokens",
                                     buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.held = Gauge("dsv4_requests_held", "Requests admitted and not yet finished",
                          registry=self.registry)
        self.held.set_function(queue_depth)
        self.registry.register(_EngineCollector(engine_metrics))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's latest snapshot at scrape time."""

    def __init__(self, engine_metrics: Callable[[], dict]):
        self.engine_metrics = engine_metrics

    def collect(self):
        snapshot = self.engine_metrics()
        running = GaugeMetricFamily("dsv4_running_sequences", "Sequences in the running batch")
        running.add_metric([], snapshot.get("running", 0))
        waiting = GaugeMetricFamily("dsv4_queue_depth", "Requests waiting for a batch slot")
        waiting.add_metric([], snapshot.get("waiting", 0))
        cache = GaugeMetricFamily("dsv4_cache_bytes", "KV cache bytes held, by layer kind", labels=["kind"])
        held = snapshot.get("cache_bytes", {})
        for kind in ("sliding", "csa", "hca"):
            cache.add_metric([kind], held.get(kind, 0))
        total = GaugeMetricFamily("dsv4_cache_bytes_total", "KV cache bytes held, all layers")
        total.add_metric([], sum(held.values()))
        return [running, waiting, cache, total]
