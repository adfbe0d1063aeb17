"""The server's Prometheus /metrics, scraped before, during (every ~1 s) and after a run.

Counters give deltas over the run (preemptions, prefix cache hits / queries, tokens); gauges
sampled during the run give peaks (KV cache usage, running and waiting requests).
Names are those service/metrics.py exports.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

KV_USAGE = "mistral_serve_kv_cache_usage_ratio"
RUNNING = "mistral_serve_num_requests_running"
WAITING = "mistral_serve_num_requests_waiting"
PREEMPTIONS = "mistral_serve_num_preemptions_total"
PREFIX_QUERIES = "mistral_serve_prefix_cache_queries_total"
PREFIX_HITS = "mistral_serve_prefix_cache_hits_total"
PROMPT_TOKENS = "mistral_serve_prompt_tokens_total"
GENERATION_TOKENS = "mistral_serve_generation_tokens_total"
REQUIRED = (KV_USAGE, RUNNING, WAITING, PREEMPTIONS, PREFIX_QUERIES, PREFIX_HITS)


class MetricsUnavailable(RuntimeError):
    """/metrics could not be read or lacks the mistral_serve_* series."""


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Every sample of the page, summed over label sets, by sample name."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, http.client.HTTPException):
            reason = "not an HTTP server (the gRPC port instead of --metrics-port?)"
        raise MetricsUnavailable(f"cannot read metrics at {url}: {reason}") from None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    missing = [name for name in REQUIRED if name not in values]
    if missing:
        raise MetricsUnavailable(f"{url} is not a mistral-serve metrics page "
                                 f"(no {', '.join(missing)})")
    return values


@dataclass
class MetricsSample:
    """Gauges at one moment; t is seconds from the benchmark start."""

    t: float
    kv_cache_usage: float
    num_requests_running: float
    num_requests_waiting: float


@dataclass
class ServerStats:
    """What the server's metrics say about one run."""

    metrics_url: str
    peak_kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: Optional[float]  # None when no prompt block was looked up
    peak_num_requests_running: int
    peak_num_requests_waiting: int
    prompt_tokens: int
    generation_tokens: int
    samples: list[MetricsSample] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class MetricsWatcher:
    """Scrapes before a run, every interval seconds during it, and after it."""

    def __init__(self, url: str, interval: float = 1.0):
        self.url = url
        self.interval = interval
        self.samples: list[MetricsSample] = []
        self._before: dict[str, float] = {}
        self._t0 = 0.0
        self._task: Optional[asyncio.Task] = None

    def check(self) -> None:
        """Raise MetricsUnavailable now rather than after the run."""
        scrape(self.url)

    async def _sample(self) -> dict[str, float]:
        values = await asyncio.to_thread(scrape, self.url)
        self.samples.append(MetricsSample(round(time.perf_counter() - self._t0, 4),
                                          values[KV_USAGE], values[RUNNING], values[WAITING]))
        return values

    async def start(self) -> float:
        """Scrape the "before" values, start sampling, and return the run's t0 (perf_counter)."""
        self.samples = []
        self._t0 = time.perf_counter()
        self._before = await self._sample()
        self.samples[0].t = 0.0
        self._t0 = time.perf_counter()  # the run starts after the scrape, not during it
        self._task = asyncio.create_task(self._loop())
        return self._t0

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._sample()
            except MetricsUnavailable as e:  # a missed sample only lowers the peak's precision
                log.warning("%s", e)

    async def stop(self) -> ServerStats:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        after = await self._sample()
        before = self._before

        def delta(name: str) -> int:
            return int(round(after.get(name, 0.0) - before.get(name, 0.0)))

        queries, hits = delta(PREFIX_QUERIES), delta(PREFIX_HITS)
        s = self.samples
        return ServerStats(
            metrics_url=self.url,
            peak_kv_cache_usage=max(x.kv_cache_usage for x in s),
            num_preemptions=delta(PREEMPTIONS),
            prefix_cache_queries=queries, prefix_cache_hits=hits,
            prefix_cache_hit_rate=hits / queries if queries else None,
            peak_num_requests_running=int(max(x.num_requests_running for x in s)),
            peak_num_requests_waiting=int(max(x.num_requests_waiting for x in s)),
            prompt_tokens=delta(PROMPT_TOKENS), generation_tokens=delta(GENERATION_TOKENS),
            samples=list(s))
