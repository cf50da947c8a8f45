"""Prometheus metrics, one CollectorRegistry per app (no global mutable state).

Gauges (running / waiting / KV usage / in flight) are read from the engine client's last stats
snapshot at scrape time; counters and histograms are fed per request by `RequestTimer`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from model.engine import RequestOutput

if TYPE_CHECKING:
    from .engine_client import EngineClient

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class HasClient(Protocol):
    """Where the engine client is, once it runs (app.main.AppState)."""

    client: EngineClient | None


class _EngineCollector(Collector):
    def __init__(self, state: HasClient) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        client = self.state.client
        stats = client.stats if client is not None else None
        values = {
            "seedling_requests_running": ("sequences being decoded", stats.running if stats else 0),
            "seedling_requests_waiting": ("sequences waiting for a cache slot", stats.waiting if stats else 0),
            "seedling_requests_in_flight": ("items admitted by the HTTP layer",
                                            client.in_flight if client is not None else 0),
            "seedling_kv_cache_usage_ratio": ("used fraction of KV-cache token capacity",
                                              stats.kv_usage if stats else 0.0),
            "seedling_kv_cache_slots_used": ("KV-cache slots in use", stats.kv_slots_used if stats else 0),
            "seedling_prefix_cache_hits": ("prefix-cache hits (engine lifetime)",
                                           stats.prefix_cache_hits if stats else 0),
            "seedling_prefix_cache_misses": ("prefix-cache misses (engine lifetime)",
                                             stats.prefix_cache_misses if stats else 0),
            "seedling_engine_healthy": ("1 while the engine thread is alive",
                                        1 if client is not None and client.alive else 0),
        }
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(name, doc, value=float(value))


class Metrics:
    def __init__(self, state: HasClient) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("seedling_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("seedling_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("seedling_requests", "finished requests by endpoint and outcome "
                                "(finish reason, or error type)", ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("seedling_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("seedling_inter_token_latency_seconds", "time between output tokens",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("seedling_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("seedling_queue_time_seconds", "arrival to the engine scheduling the request (HTTP hand-off + waiting for a KV slot)",
                               buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(state))

    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()


class RequestTimer:
    """Per generated item: feed every RequestOutput, then `finish`."""

    def __init__(self, metrics: Metrics | None, t_arrival: float | None = None) -> None:
        self.metrics = metrics
        self.t_arrival = t_arrival if t_arrival is not None else time.perf_counter()
        self.t_last: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def on_output(self, out: RequestOutput, t_added: float | None = None) -> None:
        now = time.perf_counter()
        n_new = len(out.new_token_ids)
        if self.metrics is not None and n_new:
            if self.t_last is None:
                self.metrics.ttft.observe(now - self.t_arrival)
                if t_added is not None:  # HTTP arrival -> engine, plus the engine's own wait for a slot
                    waited = out.queue_time_s or 0.0
                    self.metrics.queue.observe(max(t_added - self.t_arrival, 0.0) + waited)
            else:
                per_token = (now - self.t_last) / n_new
                for _ in range(n_new):
                    self.metrics.itl.observe(per_token)
        if n_new:
            self.t_last = now
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens

    def finish(self) -> None:
        if self.metrics is None:
            return
        self.metrics.e2e.observe(time.perf_counter() - self.t_arrival)
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.generation_tokens.inc(self.completion_tokens)
