"""Prometheus metrics: per-request latencies recorded by the servicer, engine totals on scrape.

Everything is named mistral_serve_* and labelled with model_name. The registry is private to
one ServiceMetrics, so two servers in one process (tests) never collide.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector,
                               PlatformCollector, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.engine import EngineStats

log = logging.getLogger(__name__)

PREFIX = "mistral_serve_"
# From a cached-prefix first token (ms) to a long generation on a loaded machine (minutes).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)

StatsFn = Callable[[], Optional[EngineStats]]


class ServiceMetrics:
    """The server's metrics. observe_* are called on the asyncio thread; scrapes on HTTP's."""

    def __init__(self, model_name: str, stats_fn: StatsFn):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # resident memory, CPU seconds, open fds
        PlatformCollector(registry=self.registry)
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From request arrival to its first token.",
            TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Between consecutive tokens of one request.",
            ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "From request arrival to its end.", E2E_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Waiting in the scheduler before first running.",
            E2E_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._request_success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(model_name, stats_fn))
        self._http = None

    def request_finished(self, finished_reason: str) -> None:
        self._request_success.labels(self.model_name, finished_reason).inc()

    def start_http(self, host: str, port: int) -> None:
        """Serve /metrics on its own thread."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _EngineCollector(Collector):
    """Reads the engine's snapshot at scrape time, so gauges are never stale."""

    def __init__(self, model_name: str, stats_fn: StatsFn):
        self.model_name = model_name
        self.stats_fn = stats_fn

    def collect(self) -> Iterator[Metric]:
        stats = self.stats_fn() or EngineStats()  # zeros while the model loads
        name = self.model_name

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("kv_cache_blocks_used", "KV cache blocks held by requests or the prefix cache.",
                    stats.kv_blocks_used)
        yield gauge("kv_cache_blocks_total", "KV cache blocks in the pool.", stats.kv_blocks_total)
        yield gauge("kv_cache_usage_ratio", "kv_cache_blocks_used / kv_cache_blocks_total.",
                    stats.kv_usage)
        yield counter("num_preemptions", "Requests preempted for lack of KV blocks.",
                      stats.num_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hits)
        yield counter("engine_steps", "Forward passes run.", stats.num_steps)
        for metric, doc, value in _mlx_memory():
            yield gauge(metric, doc, value)


def _mlx_memory() -> list[tuple[str, str, float]]:
    """MLX allocator figures; empty when MLX is not importable (never fails a scrape)."""
    try:
        import mlx.core as mx

        return [
            ("mlx_active_memory_bytes", "Memory held by live MLX arrays.", mx.get_active_memory()),
            ("mlx_peak_memory_bytes", "Highest MLX active memory since start.",
             mx.get_peak_memory()),
            ("mlx_cache_memory_bytes", "Memory MLX keeps cached for reuse.",
             mx.get_cache_memory()),
        ]
    except Exception:  # noqa: BLE001 - metrics must not break on a backend without these
        return []
